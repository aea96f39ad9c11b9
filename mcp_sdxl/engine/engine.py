"""The SDXL engine: one pipeline per process, LoRAs fused, ControlNets on demand, VRAM accounted.

The engine knows nothing about MCP, leases or files: it turns a GenerationRequest into a PIL image.
Callers (mcp_sdxl.studio) decide when it may hold the GPU and where images go.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from mcp_sdxl.config import Settings
from mcp_sdxl.engine import accel, edit, lora_wrappers
from mcp_sdxl.engine import controlnet as cn
from mcp_sdxl.engine.loading import WeightSource, inference_only, load_sdxl_pipeline, own_memory, resolve_source
from mcp_sdxl.engine.lora import LoraManager, LoraSpec
from mcp_sdxl.engine.residency import HostCopy, drop_storage
from mcp_sdxl.errors import CancelledError, ConfigError, UserInputError

log = logging.getLogger(__name__)


def _quiet_libraries() -> None:
    """No progress bars or load reports on stderr: the server's log should say what matters."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

SCHEDULERS = (
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DDIMScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
)


@dataclass
class ControlInput:
    kind: str  # openpose | depth | canny
    image: Image.Image  # the control map, already at the output size
    strength: float


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 30
    cfg_scale: float = 7.5
    seed: int = 0
    scheduler: str = "DPMSolverMultistepScheduler"
    loras: list[LoraSpec] = field(default_factory=list)
    controls: list[ControlInput] = field(default_factory=list)
    control_start: float = 0.0
    control_end: float = 1.0
    init_image: Image.Image | None = None  # img2img / inpaint: the source, at width x height
    mask: Image.Image | None = None  # inpaint: white is repainted, black kept (the source's own pixels)
    strength: float = 1.0  # with init_image: how far into the noise the source goes (0: returned unchanged)
    mask_feather_px: int = 4  # the mask's edge blends over this many pixels, inside the mask

    @property
    def denoise_steps(self) -> int:
        return self.steps if self.init_image is None else edit.denoise_steps(self.steps, self.strength)


@dataclass
class GenerationOutput:
    image: Image.Image
    timings: dict[str, float]


StepCallback = Callable[[int, int], None]  # (steps done, steps total)


class Engine:
    def __init__(self, settings: Settings):
        _quiet_libraries()
        self.settings = settings
        cfg = settings.sdxl
        self.device = _pick_device(cfg.hardware.device)
        self.dtype = getattr(torch, cfg.hardware.dtype) if self.device.type == "cuda" else torch.float32
        self.profile, self.source = self._pick_profile()
        self.pipe = None
        self.state = "unloaded"  # unloaded | offloaded (weights in CPU RAM) | ready (on the device)
        self.loras: LoraManager | None = None
        self.controlnets: dict[str, torch.nn.Module] = {}
        self._compel = None
        self._host = HostCopy()  # pinned CPU RAM for offload (CUDA only)
        self._lock = threading.RLock()
        # Seconds per step per megapixel, learned from real runs; used to estimate call times.
        # seconds per denoising step per megapixel before anything ran (an SDXL UNet on a big GPU; the CPU)
        self._step_cost = 0.12 if self.device.type == "cuda" else 2.0
        self._observed: dict[int, float] = {}  # pixels -> seconds per step (one control-free call), learned

    # ------------------------------------------------------------------ profile
    def _pick_profile(self) -> tuple[str, WeightSource]:
        cfg = self.settings.sdxl
        if cfg.profile != "tiny":
            source = resolve_source(cfg.model.base_model, self.settings.models_root, cfg.model.cache_dir)
            if source is not None:
                return "sdxl", source
            if cfg.profile == "sdxl":
                raise ConfigError(
                    f"{self.settings.config_dir / 'sdxl_config.yaml'}: model.base_model: SDXL weights "
                    f"{cfg.model.base_model!r} not found (not a file or folder under {self.settings.models_root}, "
                    "not in the local Hugging Face cache). Download them, fix the path, or set profile: tiny."
                )
        from mcp_sdxl.engine import tiny

        return "tiny", WeightSource("folder", str(tiny.tiny_model_dir(self.settings.tiny_dir)))

    @property
    def model_name(self) -> str:
        return "sdxl-tiny (random weights)" if self.profile == "tiny" else self.source.location

    def lora_file(self, kind: str, name: str) -> Path:
        """The LoRA file for a registry entry; the tiny profile builds its own small ones."""
        if self.profile == "tiny":
            from mcp_sdxl.engine import tiny_profile

            return tiny_profile.ensure_tiny_lora(self.settings.tiny_dir, kind, name)
        return self.settings.model_path(self.settings.lora(kind, name).lora_path)

    # ------------------------------------------------------------------ residency
    def load(self) -> float:
        """Put the pipeline on the device (loading it first if needed). Returns seconds taken."""
        with self._lock:
            start = time.perf_counter()
            if self.state == "ready":
                return 0.0
            if self.pipe is None:
                self._apply_vram_limit()
                self.pipe = self._load_pipeline()
                self.loras = LoraManager(self.pipe)
                lora_wrappers.guard_lora_manager(self.loras, self.pipe)  # fused QKV follows LoRAs; wrappers out of the hot path
            if self.state == "offloaded":
                self._host.restore(self._weight_modules(), self.device)  # pinned buffers -> GPU
            self.pipe.to(self.device)
            for model in self.controlnets.values():
                model.to(self.device)
            self.loras.move_clean_copies(pin=self.device.type == "cuda")
            self.state = "ready"
            return time.perf_counter() - start

    def _apply_vram_limit(self) -> None:
        limit = self.settings.sdxl.hardware.vram_limit_gb
        if limit is not None and self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory
            # caps what torch's allocator may reserve; the CUDA context (~0.5 GiB) comes on top
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit * 2**30 / total), index)

    def _weight_modules(self) -> list[torch.nn.Module]:
        modules = [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]
        modules += list(self.controlnets.values())
        # peft wrappers swapped out of the model while their LoRAs are fused still hold adapter weights
        modules += [wrapper for _, _, wrapper in accel.state_of(self.pipe).stripped]
        return modules

    def _memory_is_tight(self) -> bool:
        """Keep one kind of call's CUDA graphs at a time (performance.graphs_keep; auto: a VRAM cap, or a card
        under 24 GiB: SDXL with two ControlNets plus every kind's graphs reached 18.6 GiB reserved on an H200)."""
        keep = self.settings.sdxl.performance.graphs_keep
        if keep != "auto":
            return keep == "one_kind"
        if self.settings.sdxl.hardware.vram_limit_gb is not None:
            return True
        if self.device.type != "cuda":
            return False
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory < 24 * 2**30

    def offload(self) -> float:
        """Move weights to pinned CPU RAM (fast to bring back) and free the GPU."""
        with self._lock:
            start = time.perf_counter()
            if self.state == "ready" and self.device.type == "cuda":
                accel.release(self.pipe)  # CUDA graphs hold device memory and weight addresses
                self._host.offload(self._weight_modules())
                self.state = "offloaded"
                _free_cuda()
            return time.perf_counter() - start

    def unload(self) -> float:
        """Drop every weight (GPU and CPU)."""
        with self._lock:
            start = time.perf_counter()
            accel.release(self.pipe)
            modules = self._weight_modules() if self.pipe is not None else []
            self._host.clear()
            self.pipe = self.loras = self._compel = None
            self.controlnets.clear()
            self.state = "unloaded"
            # pyparsing's packrat cache (switched on process-wide by matplotlib, which mediapipe imports)
            # keeps compel's parse exceptions, whose tracebacks hold generate()'s frame and so the pipeline.
            pyparsing = sys.modules.get("pyparsing")
            if pyparsing is not None:
                pyparsing.ParserElement.reset_cache()
            gc.collect()
            # whatever may still reference a module (seen on an H200: 11.8 GiB still allocated after an
            # unload that followed an out-of-memory retry), its weights' memory goes now
            drop_storage(modules)
            del modules
            _free_cuda()
            return time.perf_counter() - start

    def _load_pipeline(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        cfg = self.settings.sdxl
        if self.profile == "tiny":
            from mcp_sdxl.engine import tiny

            tiny.ensure_tiny_model(self.settings.tiny_dir)
        vae = None
        if cfg.model.vae and self.profile == "sdxl":
            vae = resolve_source(cfg.model.vae, self.settings.models_root, cfg.model.cache_dir)
            if vae is None:
                raise ConfigError(f"sdxl_config.yaml: model.vae: {cfg.model.vae!r} not found locally")
        single_file_config = cfg.model.single_file_config
        if single_file_config:
            single_file_config = self.settings.model_path(single_file_config)
        pipe = load_sdxl_pipeline(
            self.source,
            self.dtype,
            variant=cfg.model.variant if self.profile == "sdxl" else None,
            cache_dir=cfg.model.cache_dir,
            single_file_config=single_file_config,
            vae=vae,
        )
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                inference_only(component)
                if self.device.type == "cpu":  # same weights, same image, whichever file layout they came from
                    own_memory(component)
        # PyTorch SDPA everywhere; xformers is never enabled (config rejects it).
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = _make_scheduler(cfg.generation.scheduler, pipe.scheduler.config)
        from mcp_sdxl.engine.accel import optimize_pipeline

        optimize_pipeline(pipe, cfg.performance, self.device, cache_root=self.settings.home,
                          one_family=self._memory_is_tight())
        return pipe

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationOutput:
        with self._lock:
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled before start")
            if request.init_image is not None and request.strength == 0:
                # diffusers would run no step and fail; "change nothing" is the source itself
                return GenerationOutput(request.init_image.copy(), {"load_s": 0.0, "denoise_s": 0.0})
            timings: dict[str, float] = {"load_s": self.load()}
            pipe = self.pipe
            started = time.perf_counter()
            self.loras.apply(request.loras)
            timings["lora_s"] = time.perf_counter() - started

            if request.scheduler != type(pipe.scheduler).__name__:
                pipe.scheduler = _make_scheduler(request.scheduler, pipe.scheduler.config)

            started = time.perf_counter()
            embeds = self._encode(request.prompt, request.negative_prompt)
            timings["encode_s"] = time.perf_counter() - started

            step_times: list[float] = []
            total_steps = request.denoise_steps

            def on_step_end(p, step, timestep, callback_kwargs):
                step_times.append(time.perf_counter())
                if on_step is not None:
                    on_step(step + 1, total_steps)
                if cancel is not None and cancel.is_set():
                    p._interrupt = True
                return callback_kwargs

            # CUDA graphs are kept per kind of call; under a VRAM cap only the current kind's, and the
            # other kinds' memory goes before this call loads its ControlNets
            accel.begin_call(pipe, (request.width, request.height, tuple(c.kind for c in request.controls),
                                    request.cfg_scale > 1))
            for attempt in range(4):
                step_times.clear()
                generator = torch.Generator("cpu").manual_seed(request.seed)  # a retry makes the same image
                try:
                    run_pipe, extra = pipe, {"width": request.width, "height": request.height}
                    if request.init_image is not None:  # img2img takes its size from the image
                        run_pipe, extra = edit.prepare(self, request)
                    elif request.controls:  # a ControlNet's first use loads it: not denoising time
                        prepared = time.perf_counter()
                        run_pipe, extra = cn.prepare(self, request)
                        timings["control_s"] = time.perf_counter() - prepared
                    started = time.perf_counter()
                    with torch.inference_mode(), cn.skip_outside_window(run_pipe):
                        result = run_pipe(
                            **embeds,
                            **extra,
                            num_inference_steps=request.steps,
                            guidance_scale=request.cfg_scale,
                            generator=generator,
                            callback_on_step_end=on_step_end,
                            output_type="pil",
                        )
                    break
                except torch.OutOfMemoryError as exc:
                    # Graphs are a speed-up: their memory goes before the call fails (then the call reruns).
                    if attempt < 3 and accel.after_oom(pipe, cancelled=cancel.is_set if cancel is not None else None):
                        if cancel is not None and cancel.is_set():
                            raise CancelledError("generation cancelled") from exc
                        log.warning("out of GPU memory at %dx%d: retrying without the graphs' memory",
                                    request.width, request.height)
                        continue
                    _free_cuda()
                    raise RuntimeError(
                        "the GPU ran out of memory during generation; the engine has recovered. "
                        "Try a smaller size, fewer ControlNets, or release the GPU from other programs."
                    ) from exc
            if cancel is not None and cancel.is_set():
                raise CancelledError("generation cancelled")
            finished = time.perf_counter()
            timings["denoise_s"] = (step_times[-1] if step_times else finished) - started
            timings["decode_s"] = finished - (step_times[-1] if step_times else finished)
            if attempt == 0:  # a rerun after an out-of-memory error says nothing about a step's time
                self._learn_step_cost(timings["denoise_s"], request)
            image = result.images[0]
            if request.mask is not None:
                image = edit.keep_outside_mask(request.init_image, image, request.mask, request.mask_feather_px)
            return GenerationOutput(image, {k: round(v, 4) for k, v in timings.items()})

    def upscale(self, request: GenerationRequest, tile: int, overlap: int, on_step: StepCallback | None = None,
                cancel: threading.Event | None = None) -> GenerationOutput:
        """`request.init_image` resized to width x height (Lanczos), then repainted tile by tile by img2img at
        `request.strength` (each tile a seed of its own); neighbours blend over `overlap` pixels. A tile's
        memory is that of one `tile`-sized image, whatever the output size."""
        size = (request.width, request.height)
        grid = edit.tile_grid(*size, tile, overlap, self.size_multiple)
        canvas = edit.pad_to(request.init_image.convert("RGB").resize(size, Image.Resampling.LANCZOS), grid.canvas)
        blender = edit.TileBlender(grid)
        timings: dict[str, float] = {}
        per_tile = edit.denoise_steps(request.steps, request.strength)
        for index, box in enumerate(grid.boxes()):
            def tile_step(done: int, total: int, index=index) -> None:
                if on_step is not None:
                    on_step(index * per_tile + min(done, per_tile), grid.count * per_tile)

            part = dataclasses.replace(request, init_image=canvas.crop(box), width=box[2] - box[0],
                                       height=box[3] - box[1], seed=request.seed + index, mask=None)
            output = self.generate(part, on_step=tile_step, cancel=cancel)
            blender.add(box, output.image)
            for key, value in output.timings.items():
                timings[key] = round(timings.get(key, 0.0) + value, 4)
        timings["tiles"] = grid.count
        return GenerationOutput(blender.image(size), timings)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's 8, the tiny UNet's 32 (it downsamples 32x)."""
        return 32 if self.profile == "tiny" else 8

    def _encode(self, prompt: str, negative_prompt: str) -> dict:
        """Both SDXL text encoders through compel: weighting syntax and prompts over 77 tokens work."""
        from compel import CompelForSDXL

        if self._compel is None:
            self._compel = CompelForSDXL(self.pipe, device=self.device)
            # compel parses each string once per text encoder with a fresh pyparsing grammar (~60 ms for a
            # 100-character prompt, 0.25 s of every SDXL call): parse each distinct string once
            for inner in (self._compel.compel_1, self._compel.compel_2):
                inner.parse_prompt_string = parse_prompt
        with torch.inference_mode():
            c = self._compel(prompt, negative_prompt=negative_prompt)
        return {
            "prompt_embeds": c.embeds,
            "pooled_prompt_embeds": c.pooled_embeds,
            "negative_prompt_embeds": c.negative_embeds,
            "negative_pooled_prompt_embeds": c.negative_pooled_embeds,
        }

    # ------------------------------------------------------------------ estimates and status
    def estimate_seconds(self, width: int, height: int, steps: int, n_controls: int = 0) -> float:
        return self._step_seconds(width * height) * steps * (1 + 0.8 * n_controls) + 1.0

    def _step_seconds(self, pixels: int) -> float:
        """A step's time at `pixels`: what was measured at that size, else a line a + b * megapixels through
        the sizes measured. A step has a fixed cost besides its per-pixel one: scaling small images' time by
        pixels alone sent a 256x256 call that takes 6 s to the background as a 55 s job."""
        if pixels in self._observed:
            return self._observed[pixels]
        mp = pixels / 1e6
        points = [(p / 1e6, c) for p, c in self._observed.items()]
        if not points:
            return self._step_cost * mp
        if len(points) == 1:  # the prior's per-pixel cost; what the one size took beyond it is fixed cost
            (mp0, c0), = points
            per_mp = min(self._step_cost, c0 / mp0)
            return max(0.0, c0 - per_mp * mp0) + per_mp * mp
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        var = sum((x - mean_x) ** 2 for x, _ in points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
        if slope <= 0:  # noise on sizes too close to tell apart: the nearest measured size
            return min(points, key=lambda xy: abs(xy[0] - mp))[1]
        fixed = mean_y - slope * mean_x
        if fixed < 0:  # a line through zero, fitted to the largest size
            mp1, c1 = max(points)
            return c1 / mp1 * mp
        return fixed + slope * mp

    def _learn_step_cost(self, denoise_s: float, request: GenerationRequest) -> None:
        pixels = request.width * request.height
        observed = denoise_s / max(1, request.denoise_steps) / (1 + 0.8 * len(request.controls))
        before = self._observed.get(pixels)
        if before is None:
            before = self._step_seconds(pixels)  # the first run of a size moves halfway from the estimate
        self._observed[pixels] = 0.5 * before + 0.5 * observed
        if len(self._observed) > 16:  # the sizes asked for most recently
            self._observed.pop(next(iter(self._observed)))

    def status(self) -> dict:
        info = {
            "profile": self.profile,
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "state": self.state,
            "loras_loaded": sorted(self.loras.loaded) if self.loras else [],
            "loras_active": [{"adapter": n, "weight": w} for n, w in self.loras.active] if self.loras else [],
            "controlnets_loaded": sorted(self.controlnets),
        }
        if self.device.type == "cuda":
            info["torch_allocated_gb"] = round(torch.cuda.memory_allocated() / 2**30, 3)
            info["torch_reserved_gb"] = round(torch.cuda.memory_reserved() / 2**30, 3)
            info["torch_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return info

    def attention_backends(self) -> dict[str, list[str]]:
        """Which attention implementation each model uses (to verify SDPA is in force)."""
        if self.pipe is None:
            return {}
        return {
            "unet": sorted({type(p).__name__ for p in self.pipe.unet.attn_processors.values()}),
            "vae": sorted({type(p).__name__ for p in self.pipe.vae.attn_processors.values()}),
            "text_encoder": [self.pipe.text_encoder.config._attn_implementation],
            "text_encoder_2": [self.pipe.text_encoder_2.config._attn_implementation],
        }


@functools.lru_cache(maxsize=512)
def _parse_prompt_cached(text: str):
    from compel import Compel

    return Compel.parse_prompt_string(text)


def parse_prompt(text: str):
    """compel's parse of a prompt string (its Conjunction), memoised; a copy, so no caller changes the cache."""
    return copy.deepcopy(_parse_prompt_cached(text))


def _pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("sdxl_config.yaml: hardware.device: cuda requested but no CUDA GPU is visible")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _make_scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise UserInputError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, name).from_config(config)


def _free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
