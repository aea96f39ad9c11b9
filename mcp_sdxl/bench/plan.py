"""What the benchmark runs: constants, lever variants, the plan, scenarios, timing, memory and the output check."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mcp_sdxl.bench.assets import Assets


PROCESS_T0 = time.time()


log = logging.getLogger("mcp_sdxl.bench")

PROMPT = "portrait of a young explorer in a red scarf, seaside town at golden hour, detailed, cinematic lighting"
NEGATIVE = "blurry, low quality, deformed hands"
SEED = 1234
LORA_RANK = 32
# Output check: the engine's image against the reference's (same weights, seed, prompt embeddings path).
# Pixel values 0-255. Two unrelated images differ by ~50-80 on average; fp16 rounding changes ~0-2.
TOLERANCE = {"mean_abs_max": 2.0, "psnr_db_min": 30.0}

# Engine variants: overrides of the `performance:` section ("default" = as configured).
OFF = dict(channels_last=False, fuse_qkv=False, cuda_graphs=False, compile="off", strip_lora_wrappers=False,
           vae_dtype="auto")
VARIANTS: dict[str, dict | None] = {
    "default": None,
    "eager": dict(OFF),
    "eager+strip": dict(OFF, strip_lora_wrappers=True),
    "channels_last": dict(OFF, channels_last=True),
    "cl+qkv": dict(OFF, channels_last=True, fuse_qkv=True),
    "graphs": dict(OFF, cuda_graphs=True, strip_lora_wrappers=True),
    "cl+graphs": dict(OFF, channels_last=True, cuda_graphs=True, strip_lora_wrappers=True),
    "cl+qkv+graphs": dict(channels_last=True, fuse_qkv=True, cuda_graphs=True, compile="off", strip_lora_wrappers=True,
                          vae_dtype="auto"),
    "regional": dict(channels_last=True, fuse_qkv=True, cuda_graphs=False, compile="regional", strip_lora_wrappers=True),
    "regional+graphs": dict(channels_last=True, fuse_qkv=True, cuda_graphs=True, compile="regional",
                            strip_lora_wrappers=True, vae_dtype="auto"),
    "full": dict(compile="full"),
    "compile-regional": dict(compile="regional"),
    "one-kind": dict(graphs_keep="one_kind"),
    "expandable": dict(expandable_segments=True),
    "no-expandable": dict(expandable_segments=False),
    "one-kind+expandable": dict(graphs_keep="one_kind", expandable_segments=True),
    "vae-bf16": dict(vae_dtype="bfloat16"),
    "vae-fp32": dict(vae_dtype="auto"),
    "no-compile": dict(compile="off"),
    "eager-decode": dict(compile_vae_decode=False),
    "qkv": dict(fuse_qkv=True),
    "cudnn-bench": dict(cudnn_benchmark=True),
}
SCENARIOS = ("base", "loras3", "cn1", "cn2", "edit", "inpaint", "upscale2x")
EDIT_SCENARIOS = ("edit", "inpaint", "upscale2x")  # edit_image, edit_image with a mask, upscale_image
DEFAULT_VARIANTS_CUDA = "default:all,compile-regional:base+cn1,no-compile:base+loras3,eager:base+loras3"


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    device: str
    full: bool  # full-size SDXL on CUDA (else the tiny smoke test)
    width: int
    height: int
    steps: int
    cfg: float
    repeats: int
    warmups: int
    quick: bool
    variants: list  # [(name, scenarios tuple, overrides)]
    budget_s: float | None
    workdir: Path
    vram_limit_gb: float | None
    cold_start: bool

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - (time.time() - PROCESS_T0)


def parse_variants(text: str) -> list:
    out = []
    for item in [v.strip() for v in text.split(",") if v.strip()]:
        name, _, which = item.partition(":")
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        scenarios = SCENARIOS if which in ("", "all") else tuple(which.split("+"))
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise SystemExit(f"unknown scenario(s) {unknown} in {item!r}; known: {', '.join(SCENARIOS)}")
        out.append((name, scenarios, VARIANTS[name]))
    return out


# ------------------------------------------------------------------------------------------------ memory
class Vram:
    """Peak VRAM per scenario: torch's allocator (allocated, reserved) and NVML's device memory in use."""

    def __init__(self, cuda: bool, blocks: bool = False):
        self.cuda = cuda
        self.blocks = blocks  # --memory-blocks: where live memory was allocated, in every snapshot
        self.nvml = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread = None
        if not cuda:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            import torch

            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.baseline = self.used()
            self._thread = threading.Thread(target=self._poll, daemon=True, name="bench-nvml")
            self._thread.start()
        except Exception as exc:  # no NVML: torch numbers only
            log.warning("NVML unavailable (%s); VRAM from torch only", exc)
            self.nvml = None

    def used(self) -> int:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used if self.nvml else 0

    def process_used(self) -> int | None:
        if not self.nvml:
            return None
        try:
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return proc.usedGpuMemory
        except Exception:
            return None
        return None

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(Exception):
                self._peak = max(self._peak, self.used())

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._peak = self.used()

    def peaks(self) -> dict:
        if not self.cuda:
            return {}
        import torch

        torch.cuda.synchronize()
        out = {
            "peak_allocated_gib": _gib(torch.cuda.max_memory_allocated()),
            "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved()),
        }
        if self.nvml:
            self._peak = max(self._peak, self.used())
            out["nvml_peak_used_gib"] = _gib(self._peak)
            out["nvml_peak_minus_baseline_gib"] = _gib(self._peak - self.baseline)
        return out

    def now(self) -> dict:
        if not self.cuda:
            return {}
        import torch

        out = {"allocated_gib": _gib(torch.cuda.memory_allocated()), "reserved_gib": _gib(torch.cuda.memory_reserved())}
        with contextlib.suppress(Exception):  # where reserved memory sits (a private torch API)
            out["reserved_by"] = reserved_breakdown(torch.cuda.memory_snapshot(), torch.cuda.current_stream().cuda_stream)
        if self.blocks:
            with contextlib.suppress(Exception):
                out["live_blocks"] = live_blocks(torch.cuda.memory._snapshot()["segments"],
                                                 torch.cuda.current_stream().cuda_stream)
        if self.nvml:
            out["nvml_used_gib"] = _gib(self.used())
            proc = self.process_used()
            if proc is not None:
                out["nvml_process_gib"] = _gib(proc)
        return out

    def close(self) -> None:
        self._stop.set()


def reserved_breakdown(segments: list, main_stream: int) -> dict:
    """Sum torch's memory snapshot by where the memory is reserved: CUDA graph pools, the serving stream's
    cache, other streams' caches (capture warm-ups and background compiles run on side streams, and blocks
    freed there are not reused by the serving stream). GiB reserved and allocated in each."""
    out: dict = {}
    for seg in segments:
        row = out.setdefault(_place(seg, main_stream), {"reserved_gib": 0.0, "allocated_gib": 0.0, "segments": 0})
        row["reserved_gib"] += seg.get("total_size", 0) / 2**30
        row["allocated_gib"] += seg.get("allocated_size", 0) / 2**30
        row["segments"] += 1
    for row in out.values():
        row["reserved_gib"] = round(row["reserved_gib"], 3)
        row["allocated_gib"] = round(row["allocated_gib"], 3)
    return out


def _place(segment: dict, main_stream: int) -> str:
    """Where a snapshot segment's memory sits: a CUDA graph pool, the serving stream, another stream."""
    if tuple(segment.get("segment_pool_id") or (0, 0)) != (0, 0):
        return "graph_pools"
    return "serving_stream" if segment.get("stream", 0) == main_stream else "other_streams"


def live_blocks(segments: list, main_stream: int, top: int = 16) -> list:
    """The biggest groups of live blocks by where they sit and the Python frames that allocated them
    (torch.cuda.memory._record_memory_history must have run): 'GiB count where | frames'."""
    groups: dict = {}
    for seg in segments:
        where = _place(seg, main_stream)
        for block in seg.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = [f for f in block.get("frames", []) if f.get("filename", "").endswith(".py")]
            ours = [f for f in frames if "/torch/" not in f["filename"] or "_inductor" in f["filename"]][:3]
            shown = " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in (ours or frames[:2]))
            row = groups.setdefault((where, shown), [0, 0])
            row[0] += block.get("size", 0)
            row[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])[:top]
    return [f"{size / 2**30:.3f} GiB x{count} {where} | {shown}" for (where, shown), (size, count) in ranked]


def _gib(n) -> float:
    return round(n / 2**30, 3)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ scenarios
def lora_set(assets: Assets, character: str = "char_a", char_weight: float = 0.8) -> list:
    return [(character, char_weight), ("background", 0.6), ("style", 0.5)]


def scenario_inputs(name: str, assets: Assets, maps: dict) -> dict:
    """What a scenario asks for: LoRAs [(asset name, weight)], controls [(kind, image, strength)], window."""
    if name == "base":
        return {"loras": [], "controls": []}
    if name == "loras3":
        return {"loras": lora_set(assets), "controls": []}
    if name == "cn1":
        return {"loras": [], "controls": [("canny", maps["canny"], 1.0)]}
    if name == "cn2":
        return {"loras": [], "controls": [("canny", maps["canny"], 1.0), ("depth", maps["depth"], 0.7)]}
    if name == "cn1_window":
        return {"loras": [], "controls": [("canny", maps["canny"], 1.0)], "window": (0.0, 0.5)}
    if name == "edit":  # edit_image's default strength
        return {"loras": [], "controls": [], "source": maps["source"], "strength": 0.6}
    if name == "inpaint":  # the middle half repainted whole
        return {"loras": [], "controls": [], "source": maps["source"], "strength": 1.0, "mask": maps["mask"]}
    if name == "upscale2x":  # upscale_image's defaults: 2x, strength 0.3, 1024-pixel tiles
        return {"loras": [], "controls": [], "source": maps["source"], "strength": 0.3, "factor": 2}
    raise ValueError(name)


def measure(plan: Plan, vram: Vram, run_once, settle=None, busy=None, changes=None) -> dict:
    """Warm-up(s) then repeats of `run_once()` -> (image, info); wall seconds with the GPU synchronised.
    With a background compile (`busy()` says one runs, `changes()` counts captures and compiles): after the
    warm-ups, untimed calls run until one starts and ends with nothing compiling and nothing new captured
    or compiled (`settle()` waits for a running compile first). A compile is handed over by a call, so
    "nothing running" after the warm-ups alone is not steady: the UNet's compile may start on the next
    call, after the ControlNet's. A compile still running at the timed repeats is recorded."""
    vram.reset()
    times, infos, images = [], [], []
    first_s = None
    waited = None
    for i in range(plan.warmups + plan.repeats):
        if i == plan.warmups and settle is not None and busy is not None:
            waited = 0.0
            for _ in range(8):
                if plan.left() < 60:
                    break
                if busy():
                    waited += settle()
                before = changes() if changes is not None else None
                run_once()
                if not busy() and (changes is None or changes() == before):
                    break
        _sync()
        started = time.perf_counter()
        image, info = run_once()
        _sync()
        took = time.perf_counter() - started
        if first_s is None:
            first_s = took
        if i >= plan.warmups:
            times.append(took)
            infos.append(info)
        images.append(image)
    result = {"seconds": [round(t, 4) for t in times], "median_s": round(statistics.median(times), 4),
              "first_call_s": round(first_s, 4), **vram.peaks()}
    if waited:
        result["background_compile_wait_s"] = round(waited, 2)
    if busy is not None and busy():
        result["compile_running_during_repeats"] = True
    if infos and infos[0]:
        keys = infos[0].keys()
        result["timings_median"] = {k: round(statistics.median(i[k] for i in infos if k in i), 4) for k in keys}
    result["repeat_identical"] = bool(np.array_equal(np.asarray(images[-1]), np.asarray(images[min(1, len(images) - 1)])))
    result["after"] = vram.now()
    pixels = np.asarray(images[-1], dtype=np.float32)
    result["image_mean_std"] = [round(float(pixels.mean()), 2), round(float(pixels.std()), 2)]
    result["_image"] = images[-1]
    return result


def compare(a, b) -> dict:
    x = np.asarray(a, dtype=np.float32)
    y = np.asarray(b, dtype=np.float32)
    d = np.abs(x - y)
    mse = float((d**2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    out = {"mean_abs": round(float(d.mean()), 4), "max_abs": float(d.max()), "p99_abs": float(np.percentile(d, 99)),
           "frac_gt_8": round(float((d > 8).mean()), 5), "psnr_db": round(psnr, 2) if math.isfinite(psnr) else "inf",
           "identical": mse == 0}
    out["pass"] = out["mean_abs"] <= TOLERANCE["mean_abs_max"] and (not math.isfinite(psnr) or psnr >= TOLERANCE["psnr_db_min"])
    return out
