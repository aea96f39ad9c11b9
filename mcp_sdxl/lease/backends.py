"""How each kind of LLM server frees the GPU and takes it back (see shared/notes/gpu.md).

Every backend answers five questions:
  prepare()      -> what there is to release now, or None if nothing of the LLM holds the GPU
                    (e.g. vLLM is already asleep: someone else slept it, so we must not wake it);
  release(d)     -> free the GPU (returns once the server says it is done, polling where async);
  wake(d)        -> undo release(d);
  warmup(d)      -> one tiny request so the user's first request after wake is not the slow one;
  state()        -> a small dict for status().
`d` (a dict) is stored in the lease record so that another process can wake what a dead one slept.
"""

from __future__ import annotations

import subprocess
import time

from mcp_sdxl.config.lease import LlmConfig
from mcp_sdxl.lease.http import BackendError, call


class LlmBackend:
    name = "none"

    def __init__(self, cfg: LlmConfig) -> None:
        self.cfg = cfg
        self.url = cfg.base_url

    def _req(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None) -> object:
        return call(self.name, method, self.url + path, body, timeout=timeout or self.cfg.timeout_s, hint=self.hint)

    hint = ""

    def prepare(self) -> dict | None:
        return None

    def release(self, detail: dict) -> None:
        pass

    def wake(self, detail: dict) -> None:
        pass

    def warmup(self, detail: dict) -> None:
        pass

    def state(self, timeout: float) -> dict:
        return {}

    @staticmethod
    def merge(old: dict, new: dict | None) -> dict:
        """Combine a detail left by an earlier holder with ours: lists are united, so every model
        anyone unloaded gets reloaded."""
        out = dict(old)
        for key, value in (new or {}).items():
            if isinstance(value, list) and isinstance(out.get(key), list):
                out[key] = out[key] + [v for v in value if v not in out[key]]
            else:
                out[key] = value
        return out

    # OpenAI-compatible 1-token completion (vLLM, SGLang, llama-swap all serve /v1).
    def _openai_warmup(self, model: str | None) -> None:
        if model is None:
            models = self._req("GET", "/v1/models")
            data = models.get("data") if isinstance(models, dict) else None
            if not data:
                return
            model = data[0].get("id")
        self._req("POST", "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 1})


class NoneBackend(LlmBackend):
    """No LLM server: the lease only serialises GPU users."""

    name = "none"


class VllmBackend(LlmBackend):
    name = "vllm"
    hint = "start vLLM with --enable-sleep-mode and env VLLM_SERVER_DEV_MODE=1"

    def prepare(self) -> dict | None:
        reply = self._req("GET", "/is_sleeping")
        if isinstance(reply, dict) and reply.get("is_sleeping"):
            return None  # asleep already, not by us: leave it as we found it
        return {"level": self.cfg.vllm_sleep_level}

    def release(self, detail: dict) -> None:
        self._req("POST", f"/sleep?level={int(detail.get('level', 1))}")

    def wake(self, detail: dict) -> None:
        self._req("POST", "/wake_up")
        if int(detail.get("level", 1)) == 2 and self.cfg.vllm_reload_weights:
            # Level 2 discarded the weights; wake_up only reallocated them.
            self._req("POST", "/collective_rpc", {"method": "reload_weights"})
            self._req("POST", "/reset_prefix_cache")

    def warmup(self, detail: dict) -> None:
        self._openai_warmup(self.cfg.warmup_model)

    def state(self, timeout: float) -> dict:
        reply = self._req("GET", "/is_sleeping", timeout=timeout)
        return {"is_sleeping": reply.get("is_sleeping") if isinstance(reply, dict) else reply}


class SglangBackend(LlmBackend):
    name = "sglang"
    hint = "start SGLang with --enable-memory-saver"

    def prepare(self) -> dict | None:
        return {}  # SGLang has no "is released" query: we always release and resume

    def release(self, detail: dict) -> None:
        self._req("POST", "/release_memory_occupation", {})

    def wake(self, detail: dict) -> None:
        self._req("POST", "/resume_memory_occupation", {})

    def warmup(self, detail: dict) -> None:
        self._openai_warmup(self.cfg.warmup_model)

    def state(self, timeout: float) -> dict:
        reply = self._req("GET", "/v1/models", timeout=timeout)
        data = reply.get("data", []) if isinstance(reply, dict) else []
        return {"models": [m.get("id") for m in data]}


def _names(items: object, *keys: str) -> list[str]:
    out = []
    for item in items if isinstance(items, list) else []:
        for key in keys:
            if isinstance(item, dict) and item.get(key):
                out.append(str(item[key]))
                break
    return out


class OllamaBackend(LlmBackend):
    name = "ollama"

    def _loaded(self, timeout: float | None = None) -> list[str]:
        reply = self._req("GET", "/api/ps", timeout=timeout)
        return _names(reply.get("models") if isinstance(reply, dict) else [], "model", "name")

    def prepare(self) -> dict | None:
        loaded = self._loaded()
        return {"models": loaded} if loaded else None

    def release(self, detail: dict) -> None:
        models = detail.get("models", [])
        for model in models:
            self._req("POST", "/api/generate", {"model": model, "keep_alive": 0})
        # Unloading is asynchronous: the reply comes before the memory is free.
        deadline = time.monotonic() + self.cfg.unload_timeout_s
        while True:
            left = [m for m in self._loaded() if m in models]
            if not left:
                return
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"LLM backend ollama at {self.url}: still loaded after {self.cfg.unload_timeout_s:g} s: {left}"
                )
            time.sleep(0.2)

    def wake(self, detail: dict) -> None:
        # Ollama loads lazily on the next request; reloading now is optional (and is the warm-up).
        keep_alive = self.cfg.ollama_reload_keep_alive
        if keep_alive is None:
            return
        for model in detail.get("models", []):
            self._req("POST", "/api/generate", {"model": model, "keep_alive": keep_alive})

    def state(self, timeout: float) -> dict:
        reply = self._req("GET", "/api/ps", timeout=timeout)
        models = reply.get("models", []) if isinstance(reply, dict) else []
        return {"loaded": [{"name": m.get("name"), "size_vram": m.get("size_vram")} for m in models]}


class LlamaSwapBackend(LlmBackend):
    name = "llama_swap"

    def _running(self, timeout: float | None = None) -> list[str]:
        reply = self._req("GET", "/running", timeout=timeout)
        return _names(reply.get("running") if isinstance(reply, dict) else reply, "model", "name")

    def prepare(self) -> dict | None:
        running = self._running()
        return {"models": running} if running else None

    def release(self, detail: dict) -> None:
        self._req("GET", "/unload")
        deadline = time.monotonic() + self.cfg.unload_timeout_s
        while self._running():
            if time.monotonic() >= deadline:
                raise BackendError(f"LLM backend llama_swap at {self.url}: models still running after unload")
            time.sleep(0.2)

    # wake: nothing, llama-swap starts a model on its next request; warm-up makes that request now.
    def warmup(self, detail: dict) -> None:
        for model in detail.get("models", [])[:1]:
            self._openai_warmup(model)

    def state(self, timeout: float) -> dict:
        return {"running": self._running(timeout)}


class ShellBackend(LlmBackend):
    name = "shell"

    def __init__(self, cfg: LlmConfig) -> None:
        super().__init__(cfg)
        self.url = f"shell: stop={cfg.shell_stop!r} start={cfg.shell_start!r}"

    def _run(self, command: str) -> None:
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", command], check=False, capture_output=True, text=True, timeout=self.cfg.timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"LLM backend shell: {command!r} took over {self.cfg.timeout_s:g} s") from exc
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-300:]
            raise BackendError(f"LLM backend shell: {command!r} exited {done.returncode}: {tail}")

    def prepare(self) -> dict | None:
        return {}

    def release(self, detail: dict) -> None:
        self._run(self.cfg.shell_stop or "")

    def wake(self, detail: dict) -> None:
        self._run(self.cfg.shell_start or "")


BACKENDS: dict[str, type[LlmBackend]] = {
    cls.name: cls for cls in (NoneBackend, VllmBackend, SglangBackend, OllamaBackend, LlamaSwapBackend, ShellBackend)
}


def make_backend(cfg: LlmConfig) -> LlmBackend:
    return BACKENDS[cfg.backend](cfg)


__all__ = ["BACKENDS", "BackendError", "LlmBackend", "make_backend"]
