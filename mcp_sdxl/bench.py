"""`mcp-sdxl bench`: the plain diffusers pipeline against this engine, same weights, same seeds (issue 8).

One process runs, on the same architecture and weights:
- the reference: what the seed's SDXLPipelineManager did (diffusers StableDiffusionXLPipeline in fp16 eager,
  PyTorch SDPA, peft `set_adapters` for LoRAs, StableDiffusionXLControlNetPipeline for ControlNets);
- the engine (`mcp_sdxl.engine.Engine`) in one or more lever variants (`--variants`).
Scenarios: base, 3 LoRAs, 1 ControlNet, 2 ControlNets (plus extras on the first variant: LoRA switching, a
ControlNet window, a step callback, lease-style release and re-acquire). Then cold starts in fresh processes.
Each scenario: seconds per image (median of --repeats after one warm-up), peak VRAM (torch allocated and
reserved, NVML device memory), the engine/reference ratio, and an output check (the engine's image against
the reference's, same seed) within a stated tolerance.

Weights: the configured SDXL weights when they are found; otherwise, on CUDA, full-size SDXL-base shapes with
random weights built on the GPU from the shipped config (latency does not depend on weight values) and saved
as a real diffusers folder, with random rank-32 LoRA files and a full-size random ControlNet; on the CPU (or
with --profile tiny) the tiny engine (a smoke test that runs in seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

PROCESS_T0 = time.time()

import numpy as np  # noqa: E402

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
    "vae-bf16": dict(vae_dtype="bfloat16"),
    "vae-fp32": dict(vae_dtype="auto"),
    "no-compile": dict(compile="off"),
    "qkv": dict(fuse_qkv=True),
    "cudnn-bench": dict(cudnn_benchmark=True),
}
SCENARIOS = ("base", "loras3", "cn1", "cn2")
DEFAULT_VARIANTS_CUDA = "default:all,no-compile:all,eager:base+loras3,graphs:base,vae-fp32:base"


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


# ------------------------------------------------------------------------------------------------ report
class Report:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"meta": {}, "setup": {}, "reference": {}, "engine": {}, "cold_start": {}, "micro": {},
                           "errors": []}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default))
        os.replace(tmp, self.path)

    def error(self, where: str, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        self.data["errors"].append({"where": where, "error": text[:2000], "trace": traceback.format_exc()[-3000:]})
        log.error("%s: %s", where, text)
        self.save()
        return text


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


# ------------------------------------------------------------------------------------------------ memory
class Vram:
    """Peak VRAM per scenario: torch's allocator (allocated, reserved) and NVML's device memory in use."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
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
        if self.nvml:
            out["nvml_used_gib"] = _gib(self.used())
            proc = self.process_used()
            if proc is not None:
                out["nvml_process_gib"] = _gib(proc)
        return out

    def close(self) -> None:
        self._stop.set()


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


# ------------------------------------------------------------------------------------------------ assets
@dataclass
class Assets:
    kind: str  # tiny | random | real
    model_dir: Path | None  # diffusers folder (tiny, random)
    source: object  # WeightSource
    loras: dict  # name -> Path: char_a, char_b, background, style
    controlnets: dict  # control kind -> Path
    info: dict = field(default_factory=dict)


def prepare_assets(settings, plan: Plan, report: Report) -> Assets:
    from mcp_sdxl.engine.loading import SDXL_BASE_CONFIG_DIR, WeightSource, resolve_source

    cfg = settings.sdxl
    started = time.perf_counter()
    if not plan.full:
        from mcp_sdxl.engine import tiny
        from mcp_sdxl.engine.tiny import build_tiny_lora

        model_dir = tiny.ensure_tiny_model(settings.tiny_dir)
        loras = {}
        for i, (name, fmt, te) in enumerate(
            [("char_a", "diffusers", False), ("char_b", "diffusers", False), ("background", "kohya", False),
             ("style", "kohya", True)]
        ):
            loras[name] = build_tiny_lora(model_dir, plan.workdir / "loras" / f"{name}.safetensors", seed=100 + i,
                                          fmt=fmt, text_encoder=te)
        controlnets = {k: tiny.ensure_tiny_controlnet(settings.tiny_dir, k) for k in ("canny", "depth")}
        assets = Assets("tiny", model_dir, WeightSource("folder", str(model_dir)), loras, controlnets)
    else:
        source = resolve_source(cfg.model.base_model, settings.models_root, cfg.model.cache_dir)
        if cfg.profile == "sdxl" and source is None:
            raise SystemExit(f"profile sdxl: SDXL weights {cfg.model.base_model!r} not found")
        if source is not None:
            assets = _real_assets(settings, plan, source)
        else:
            model_dir = build_random_sdxl(plan.workdir / "sdxl-random", report)
            assets = Assets("random", model_dir, WeightSource("folder", str(model_dir)), {}, {})
            assets.controlnets = {k: build_random_controlnet(model_dir, plan.workdir / "controlnet-random")
                                  for k in ("canny", "depth")}
        assets.loras = build_random_loras(assets, plan.workdir / f"loras-{assets.kind}", SDXL_BASE_CONFIG_DIR)
    report.data["setup"].update(assets_s=round(time.perf_counter() - started, 2), weights=assets.kind,
                                model=str(assets.source.location), loras={k: str(v) for k, v in assets.loras.items()},
                                controlnets={k: str(v) for k, v in assets.controlnets.items()})
    report.save()
    return assets


def _real_assets(settings, plan: Plan, source) -> Assets:
    from mcp_sdxl.engine.loading import resolve_source

    controlnets = {}
    for kind in ("canny", "depth", "openpose"):
        entry = settings.controlnet.controlnets.get(kind)
        found = resolve_source(entry.model, settings.models_root, entry.cache_dir) if entry else None
        if found is not None and found.kind != "hub":
            controlnets[kind] = Path(found.location)
        if len(controlnets) == 2:
            break
    assets = Assets("real", None, source, {}, controlnets)
    if len(controlnets) < 2:  # random full-size ControlNets from the real UNet's shapes
        missing = [k for k in ("canny", "depth") if k not in controlnets][: 2 - len(controlnets)]
        folder = build_random_controlnet(None, plan.workdir / "controlnet-random", settings=settings, source=source)
        for kind in missing:
            controlnets[kind] = folder
    return assets


def _stamp(**params) -> str:
    from mcp_sdxl.engine.tiny._atomic import stamp

    return stamp(**params)


def build_random_sdxl(dest: Path, report: Report) -> Path:
    """Full-size SDXL-base architecture with random weights, built on the GPU in fp16, saved as a diffusers folder."""
    from mcp_sdxl.engine.tiny._atomic import build_dir_once

    def build(tmp: Path) -> None:
        import torch
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from mcp_sdxl.engine.loading import SDXL_BASE_CONFIG_DIR as cfg
        from mcp_sdxl.engine.tiny.pipeline import copy_sdxl_tokenizers

        started = time.perf_counter()
        torch.manual_seed(0)
        with torch.device("cuda"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet")).half()
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae")).half()
            te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder")).half()
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder_2")).half()
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2,
            tokenizer=CLIPTokenizer.from_pretrained(cfg, subfolder="tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(cfg, subfolder="tokenizer_2"),
            unet=unet, scheduler=EulerDiscreteScheduler.from_pretrained(cfg, subfolder="scheduler"),
        )
        _sync()
        built = time.perf_counter()
        pipe.save_pretrained(tmp, safe_serialization=True)
        copy_sdxl_tokenizers(tmp)
        report.data["setup"].update(random_build_s=round(built - started, 2),
                                    random_save_s=round(time.perf_counter() - built, 2),
                                    unet_params_b=round(sum(p.numel() for p in unet.parameters()) / 1e9, 3))
        del pipe, unet, vae, te1, te2
        _free()

    return build_dir_once(dest, _stamp(kind="bench-random-sdxl", format=1, seed=0), build)


def build_random_controlnet(model_dir: Path | None, dest: Path, settings=None, source=None) -> Path:
    """ControlNetModel.from_unet(the UNet) with its zero-initialised output layers made non-zero."""
    from mcp_sdxl.engine.tiny._atomic import build_dir_once

    def build(tmp: Path) -> None:
        import torch
        from diffusers import ControlNetModel, UNet2DConditionModel

        if model_dir is not None:
            unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.float16)
        else:
            from mcp_sdxl.engine.loading import load_sdxl_pipeline

            unet = load_sdxl_pipeline(source, torch.float16).unet
        unet.to("cuda")
        torch.manual_seed(1)
        with torch.device("cuda"):
            net = ControlNetModel.from_unet(unet)
        with torch.no_grad():
            net.controlnet_cond_embedding.conv_out.reset_parameters()
            for layer in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                layer.reset_parameters()
                layer.weight.mul_(0.2)
        net.half().save_pretrained(tmp, safe_serialization=True)
        del net, unet
        _free()

    return build_dir_once(dest, _stamp(kind="bench-random-controlnet", format=1, base=str(model_dir or source)), build)


def build_random_loras(assets: Assets, folder: Path, base_config_dir: Path) -> dict:
    """Four rank-32 LoRAs on the UNet's attention projections: two characters (diffusers format), a
    background (Kohya format) and a style (Kohya format, also both text encoders)."""
    from mcp_sdxl.engine.tiny._atomic import build_file_once

    specs = [("char_a", "diffusers", False), ("char_b", "diffusers", False), ("background", "kohya", False),
             ("style", "kohya", True)]
    out = {}
    shapes = None
    for i, (name, fmt, te) in enumerate(specs):
        wanted = _stamp(kind="bench-lora", format=1, base=str(assets.source.location), seed=200 + i, fmt=fmt,
                        text_encoder=te, rank=LORA_RANK)

        def build(tmp: Path, i=i, fmt=fmt, te=te, wanted=wanted) -> None:
            nonlocal shapes
            from mcp_sdxl.engine.tiny.lora import _write_diffusers, _write_kohya

            if shapes is None:
                shapes = _lora_target_shapes(assets)
            layers = _random_lora_layers(shapes, seed=200 + i, text_encoder=te)
            writer = _write_diffusers if fmt == "diffusers" else _write_kohya
            writer(tmp, layers, base_config_dir, LORA_RANK, wanted)

        out[name] = build_file_once(folder / f"{name}.safetensors", wanted, build)
    return out


def _lora_target_shapes(assets: Assets) -> dict:
    """component -> {module name: (out, in)} for the usual LoRA targets, read from configs (no weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mcp_sdxl.engine.loading import SDXL_BASE_CONFIG_DIR as cfg

    base = assets.model_dir or cfg
    shapes = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(base, subfolder="text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(base, subfolder="text_encoder_2"))
    for component, model, targets in [("unet", unet, ("to_q", "to_k", "to_v", "to_out.0")),
                                      ("text_encoder", te1, ("q_proj", "k_proj", "v_proj", "out_proj")),
                                      ("text_encoder_2", te2, ("q_proj", "k_proj", "v_proj", "out_proj"))]:
        shapes[component] = {n: tuple(m.weight.shape) for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and n.endswith(targets)}
    return shapes


def _random_lora_layers(shapes: dict, seed: int, text_encoder: bool) -> dict:
    """peft-format state dicts with random factors: at weight 1 each adapter moves a weight by ~20 %."""
    import torch

    from mcp_sdxl.engine.tiny.single_file import hf_clip_name

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for component, table in shapes.items():
        if component != "unet" and not text_encoder:
            continue
        sd = {}
        b_std = 0.2 / math.sqrt(LORA_RANK) if component == "unet" else 0.05 / math.sqrt(LORA_RANK)
        for name in sorted(table):
            out_f, in_f = table[name]
            bound = 1 / math.sqrt(in_f)
            key = hf_clip_name(name) if component != "unet" else name
            sd[f"{key}.lora_A.weight"] = (torch.rand(LORA_RANK, in_f, generator=generator) * 2 - 1) * bound
            sd[f"{key}.lora_B.weight"] = torch.randn(out_f, LORA_RANK, generator=generator) * b_std
        layers[component] = {k: v.half() for k, v in sd.items()}
    return layers


def control_images(width: int, height: int) -> dict:
    """Deterministic control maps: an edge drawing (canny) and a depth ramp with shapes (depth)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(7)
    edges = Image.new("RGB", (width, height), "black")
    draw = ImageDraw.Draw(edges)
    for _ in range(24):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = rng.integers(0, width), rng.integers(0, height)
        draw.line([(x0, y0), (x1, y1)], fill="white", width=max(1, width // 256))
        draw.ellipse([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline="white")
    ramp = np.tile(np.linspace(30, 220, width, dtype=np.float32), (height, 1))
    depth = Image.fromarray(ramp.astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(depth)
    for _ in range(6):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(width // 16, width // 4)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple([int(rng.integers(120, 255))] * 3))
    return {"canny": edges, "depth": depth.filter(ImageFilter.GaussianBlur(2))}


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
    raise ValueError(name)


def measure(plan: Plan, vram: Vram, run_once) -> dict:
    """Warm-up(s) then repeats of `run_once()` -> (image, info); wall seconds with the GPU synchronised."""
    vram.reset()
    times, infos, images = [], [], []
    first_s = None
    for i in range(plan.warmups + plan.repeats):
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


# ------------------------------------------------------------------------------------------------ reference
def run_reference(settings, plan: Plan, assets: Assets, maps: dict, vram: Vram, report: Report, scenarios) -> dict:
    """The seed's way: plain diffusers pipelines, eager, peft adapters left unfused."""
    import torch
    from compel import CompelForSDXL
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLControlNetPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from mcp_sdxl.engine import loading

    dtype = torch.float16 if plan.device == "cuda" else torch.float32
    out = report.data["reference"]
    images = {}
    started = time.perf_counter()
    cfg = settings.sdxl
    variant = cfg.model.variant if assets.kind == "real" else None
    pipe = loading.load_sdxl_pipeline(assets.source, dtype, variant=variant, cache_dir=cfg.model.cache_dir)
    own = getattr(loading, "own_memory", None)
    if plan.device == "cpu" and own is not None:  # as the engine does on the CPU (aligned weights)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                own(component)
    pipe.to(plan.device)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    _sync()
    out["load_s"] = round(time.perf_counter() - started, 3)
    out["resident"] = vram.now()
    compel = CompelForSDXL(pipe, device=plan.device)

    def encode():
        with torch.inference_mode():
            c = compel(PROMPT, negative_prompt=NEGATIVE)
        return {"prompt_embeds": c.embeds, "pooled_prompt_embeds": c.pooled_embeds,
                "negative_prompt_embeds": c.negative_embeds, "negative_pooled_prompt_embeds": c.negative_pooled_embeds}

    # prompt encoding cost: compel (what the engine uses) and diffusers' own encode_prompt
    encode()
    out["encode_compel_s"] = _median_time(encode, 5)
    with torch.inference_mode():
        out["encode_diffusers_s"] = _median_time(
            lambda: pipe.encode_prompt(PROMPT, device=plan.device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=True, negative_prompt=NEGATIVE), 5)
    report.save()

    def run(p, extra, callback=None):
        def once():
            t0 = time.perf_counter()
            embeds = encode()
            encode_s = time.perf_counter() - t0
            generator = torch.Generator("cpu").manual_seed(SEED)
            with torch.inference_mode():
                result = p(**embeds, **extra, width=plan.width, height=plan.height, num_inference_steps=plan.steps,
                           guidance_scale=plan.cfg, generator=generator, output_type="pil",
                           callback_on_step_end=callback)
            return result.images[0], {"encode_s": encode_s}

        return once

    cn_models = {}

    def controlnet(kind):
        if kind not in cn_models:
            cn_models[kind] = loading.load_controlnet(loading.WeightSource("folder", str(assets.controlnets[kind])),
                                                      dtype).to(plan.device)
        return cn_models[kind]

    order = [s for s in ("base", "cn1", "cn2", "cn1_window", "loras3") if s in scenarios]
    for name in order:
        if plan.left() < 30:
            out[name] = {"skipped": "time budget"}
            continue
        try:
            inputs = scenario_inputs(name, assets, maps)
            extra, p = {}, pipe
            if inputs["controls"]:
                nets = [controlnet(kind) for kind, _, _ in inputs["controls"]]
                # from_pipe needs the dtype: without it diffusers casts every shared component to float32
                if len(nets) == 1:  # the seed's way: a single ControlNetModel
                    p = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=nets[0], torch_dtype=dtype)
                    extra = {"image": inputs["controls"][0][1],
                             "controlnet_conditioning_scale": inputs["controls"][0][2]}
                else:
                    p = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=MultiControlNetModel(nets),
                                                                      torch_dtype=dtype)
                    extra = {"image": [c[1] for c in inputs["controls"]],
                             "controlnet_conditioning_scale": [c[2] for c in inputs["controls"]]}
                start, end = inputs.get("window", (0.0, 1.0))
                extra.update(control_guidance_start=start, control_guidance_end=end)
                p.set_progress_bar_config(disable=True)
            if inputs["loras"]:
                t0 = time.perf_counter()
                for asset, _ in inputs["loras"]:
                    pipe.load_lora_weights(str(assets.loras[asset]), adapter_name=asset)
                pipe.set_adapters([a for a, _ in inputs["loras"]], adapter_weights=[w for _, w in inputs["loras"]])
                out["lora_load_s"] = round(time.perf_counter() - t0, 3)
                t0 = time.perf_counter()
                pipe.set_adapters(["char_a", "background", "style"], adapter_weights=[0.7, 0.6, 0.5])
                pipe.set_adapters([a for a, _ in inputs["loras"]], adapter_weights=[w for _, w in inputs["loras"]])
                out["lora_set_adapters_s"] = round((time.perf_counter() - t0) / 2, 4)
            result = measure(plan, vram, run(p, extra))
            images[name] = result.pop("_image")
            out[name] = result
            log.info("reference %s: %.3f s/image", name, result["median_s"])
            if name == "loras3":  # the same adapters fused by diffusers: the engine's arithmetic
                pipe.fuse_lora()
                single = dataclasses.replace(plan, warmups=0, repeats=1)
                fused = measure(single, vram, run(p, extra))
                images["loras3_fused"] = fused.pop("_image")
                out["loras3_fused"] = fused
                out["loras3_fused"]["vs_unfused"] = compare(images["loras3_fused"], images["loras3"])
            if name == "cn1" and plan.full and os.environ.get("MCP_SDXL_BENCH_DIAGNOSE"):
                out["cn1_diagnosis"] = _diagnose_controlnet(p, controlnet("canny"), extra, encode, plan, vram)
        except Exception as exc:
            out[name] = {"error": report.error(f"reference/{name}", exc)}
        report.save()
    # VAE decode cost by precision (one 1024x1024 latent)
    if plan.full and plan.left() > 30:
        with contextlib.suppress(Exception):
            out["vae_decode_ms"] = _vae_decode_costs(pipe, plan)
    report.save()
    return images


def _diagnose_controlnet(pipe, net, extra, encode, plan: Plan, vram: Vram) -> dict:
    """Why a ControlNet step costs what it does: one forward alone (cuDNN heuristics vs autotuning), the
    conditioning embedding alone, and a profile of a 3-step pipeline run (top CUDA kernels)."""
    import torch

    out = {}
    g = torch.Generator("cuda").manual_seed(5)
    lat = plan.height // 8
    x = torch.randn(2, 4, lat, lat, device="cuda", dtype=torch.float16, generator=g)
    ehs = torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16, generator=g)
    added = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16, generator=g),
             "time_ids": torch.tensor([[plan.height, plan.width, 0, 0, plan.height, plan.width]] * 2, device="cuda",
                                      dtype=torch.float16)}
    image = torch.rand(2, 3, plan.height, plan.width, device="cuda", dtype=torch.float16, generator=g)
    t = torch.tensor(500, device="cuda")
    with torch.inference_mode():
        forward = lambda: net(x, t, ehs, image, 1.0, added_cond_kwargs=added, return_dict=False)  # noqa: E731
        embed = lambda: net.controlnet_cond_embedding(image)  # noqa: E731
        unet = lambda: pipe.unet(x, t, ehs, added_cond_kwargs=added, return_dict=False)  # noqa: E731
        forward()
        vram.reset()
        out["forward_ms"] = round(_median_time(forward, 5) * 1000, 2)
        out["forward_peak_alloc_gib"] = vram.peaks().get("peak_allocated_gib")
        out["cond_embedding_ms"] = round(_median_time(embed, 5) * 1000, 2)
        out["unet_forward_ms"] = round(_median_time(unet, 5) * 1000, 2)
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            forward(), forward(), embed(), embed()
            out["forward_ms_cudnn_benchmark"] = round(_median_time(forward, 5) * 1000, 2)
            out["cond_embedding_ms_cudnn_benchmark"] = round(_median_time(embed, 5) * 1000, 2)
        finally:
            torch.backends.cudnn.benchmark = before
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            embeds = encode()
            pipe(**embeds, **extra, width=plan.width, height=plan.height, num_inference_steps=3,
                 guidance_scale=plan.cfg, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pil")
            _sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
        out["profile_3_steps_by_cuda_time"] = table.splitlines()
        out["profile_3_steps_by_cpu_time"] = prof.key_averages().table(
            sort_by="cpu_time_total", row_limit=15, max_name_column_width=70).splitlines()
    return out


def _median_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 4)


def _vae_decode_costs(pipe, plan: Plan) -> dict:
    import torch

    vae = pipe.vae
    latent = torch.randn(1, 4, plan.height // 8, plan.width // 8, device="cuda", dtype=torch.float16,
                         generator=torch.Generator("cuda").manual_seed(3))
    out = {}
    reference = None
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        vae.to(dtype)
        with torch.inference_mode():
            decode = lambda: vae.decode(latent.to(dtype) / vae.config.scaling_factor).sample  # noqa: E731
            decode()
            out[name] = round(_median_time(decode, 5) * 1000, 2)
            image = decode().float()
        if reference is None:
            reference = image
        else:
            out[f"{name}_vs_float32_mean_abs_255"] = round(float((image - reference).abs().mean() * 127.5), 4)
    vae.to(torch.float16)
    return out


# ------------------------------------------------------------------------------------------------ engine
def engine_settings(settings, assets: Assets, overrides: dict | None, vram_limit_gb: float | None = None):
    from mcp_sdxl.config.models import ControlNetEntry, Performance

    sdxl = settings.sdxl.model_copy(deep=True)
    if vram_limit_gb is not None:  # the engine's own cap and graph-memory policy (hardware.vram_limit_gb)
        sdxl.hardware.vram_limit_gb = vram_limit_gb
    if assets.kind == "random":
        sdxl.profile = "sdxl"
        sdxl.model.base_model = str(assets.model_dir)
        sdxl.model.variant = None
        sdxl.model.vae = None
    if overrides:
        sdxl.performance = Performance(**{**sdxl.performance.model_dump(), **overrides})
    controlnet = settings.controlnet.model_copy(deep=True)
    if assets.kind != "tiny":
        for kind, path in assets.controlnets.items():
            controlnet.controlnets[kind] = ControlNetEntry(model=str(path))
    return dataclasses.replace(settings, sdxl=sdxl, controlnet=controlnet)


def engine_request(plan: Plan, assets: Assets, inputs: dict):
    from mcp_sdxl.engine import ControlInput, GenerationRequest, LoraSpec

    start, end = inputs.get("window", (0.0, 1.0))
    return GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=plan.width, height=plan.height, steps=plan.steps,
        cfg_scale=plan.cfg, seed=SEED, scheduler="DPMSolverMultistepScheduler",
        loras=[LoraSpec(f"bench:{a}", assets.loras[a], w) for a, w in inputs["loras"]],
        controls=[ControlInput(kind=k, image=img, strength=s) for k, img, s in inputs["controls"]],
        control_start=start, control_end=end,
    )


def run_engine_variant(settings, plan: Plan, assets: Assets, maps: dict, vram: Vram, report: Report,
                       name: str, scenarios, overrides, ref_images: dict, main: bool) -> None:
    from mcp_sdxl.engine import Engine
    from mcp_sdxl.engine import accel

    out = report.data["engine"].setdefault(name, {})
    v_settings = engine_settings(settings, assets, overrides, plan.vram_limit_gb)
    out["performance"] = v_settings.sdxl.performance.model_dump()
    cudnn_before = _cudnn_benchmark()
    engine = Engine(v_settings)
    try:
        vram.reset()
        out["load_s"] = round(engine.load(), 3)
        out["resident"] = vram.now()
        out["attention"] = engine.attention_backends()
        out["levers_applied"] = dict(accel.state_of(engine.pipe).applied)
        report.save()
        todo = [s for s in ("base", "loras3") if s in scenarios]
        if main and "loras3" in scenarios:
            todo.append("lora_switch")
        todo += [s for s in ("cn1", "cn2") if s in scenarios]
        if main and "cn1" in scenarios and not plan.quick:
            todo.append("cn1_window")
        if main and "base" in scenarios and not plan.quick:
            todo.append("base_callback")
        for scenario in todo:
            if plan.left() < 40:
                out.setdefault("scenarios", {})[scenario] = {"skipped": "time budget"}
                continue
            try:
                if scenario == "lora_switch":
                    out["lora_switch"] = _lora_switch(engine, plan, assets)
                    continue
                callback = None
                if scenario == "base_callback":  # the studio's kind of progress callback
                    progress = []
                    callback = lambda done, total: progress.append((done, time.perf_counter()))  # noqa: E731
                inputs = scenario_inputs("base" if scenario == "base_callback" else scenario, assets, maps)
                request = engine_request(plan, assets, inputs)

                def once(request=request, callback=callback):
                    output = engine.generate(request, on_step=callback)
                    return output.image, output.timings

                result = measure(plan, vram, once)
                image = result.pop("_image")
                ref_name = "base" if scenario == "base_callback" else scenario
                ref = report.data["reference"].get(ref_name, {})
                if ref_name == "loras3" and "loras3_fused" in ref_images:
                    # diffusers' fuse_lora: the engine's arithmetic (fused weights); vs unfused peft for the record
                    result["output_check"] = compare(image, ref_images["loras3_fused"])
                    result["output_check_vs_unfused_reference"] = compare(image, ref_images["loras3"])
                elif ref_name in ref_images:
                    result["output_check"] = compare(image, ref_images[ref_name])
                if isinstance(ref, dict) and ref.get("median_s"):
                    result["speedup_vs_reference"] = round(ref["median_s"] / result["median_s"], 3)
                out.setdefault("scenarios", {})[scenario] = result
                if scenario == "base" and main:
                    ref_images.setdefault("_engine_base", image)
                log.info("engine %s %s: %.3f s/image", name, scenario, result["median_s"])
            except Exception as exc:
                out.setdefault("scenarios", {})[scenario] = {"error": report.error(f"engine/{name}/{scenario}", exc)}
            report.save()
        out["graphs"] = accel.graph_stats(engine.pipe) if engine.pipe is not None else {}
        if engine.pipe is not None:
            st = accel.state_of(engine.pipe)
            out["graph_policy"] = {"one_family": st.one_family, "captures_off": st.captures_off}
        if main and plan.left() > 60:
            release = out["release"] = {}
            try:
                _release_cycle(engine, plan, assets, maps, vram, release)
            except Exception as exc:
                release["error"] = report.error(f"engine/{name}/release", exc)
    except Exception as exc:
        out["error"] = report.error(f"engine/{name}", exc)
    finally:
        with contextlib.suppress(Exception):
            engine.unload()
        del engine
        _free()
        _set_cudnn_benchmark(cudnn_before)
        out["after_unload"] = vram.now()
        report.save()


def _cudnn_benchmark() -> bool:
    import torch

    return torch.backends.cudnn.benchmark


def _set_cudnn_benchmark(value: bool) -> None:
    import torch

    torch.backends.cudnn.benchmark = value


def _lora_switch(engine, plan: Plan, assets: Assets) -> dict:
    """Switch character (weights change), then back, then change a weight: the engine's lora_s each time."""
    from mcp_sdxl.engine import accel

    out = {}
    steps = [("switch_to_new_character_first_time", lora_set(assets, "char_b")),
             ("switch_back_to_loaded_character", lora_set(assets, "char_a")),
             ("change_character_weight", lora_set(assets, "char_a", 0.6)),
             ("to_no_lora", []),
             ("back_to_3_loras", lora_set(assets, "char_a"))]
    if plan.quick:
        steps = steps[:2]
    for label, loras in steps:
        request = engine_request(plan, assets, {"loras": loras, "controls": []})
        _sync()
        started = time.perf_counter()
        output = engine.generate(request)
        _sync()
        out[label] = {"lora_s": output.timings.get("lora_s"), "image_s": round(time.perf_counter() - started, 4),
                      "breakdown": dict(accel.state_of(engine.pipe).applied.get("last_lora_update_s", {}))}
    return out


def _release_cycle(engine, plan: Plan, assets: Assets, maps: dict, vram: Vram, out: dict) -> dict:
    """Lease-style: offload to pinned CPU RAM and back (twice: the first allocates the pinned buffers),
    unload and reload, with VRAM left after each release and the image checked against the one before.
    Fills `out` as it goes, so a failure keeps what was measured before it."""
    out["before"] = vram.now()
    request = engine_request(plan, assets, scenario_inputs("base", assets, maps))
    images = {}

    def image_s(label):
        _sync()
        t0 = time.perf_counter()
        images[label] = engine.generate(request).image
        _sync()
        return round(time.perf_counter() - t0, 4)

    image_s("before")
    for cycle in ("", "_again"):
        out[f"offload{cycle}_s"] = round(engine.offload(), 3)
        out[f"after_offload{cycle}"] = vram.now()
        out[f"reacquire_from_cpu{cycle}_s"] = round(engine.load(), 3)
        out[f"first_image_after_reacquire{cycle}_s"] = image_s(f"reacquire{cycle}")
    out["second_image_after_reacquire_s"] = image_s("reacquire_2")
    out["unload_s"] = round(engine.unload(), 3)
    out["after_unload"] = vram.now()
    out["reload_from_disk_s"] = round(engine.load(), 3)
    out["first_image_after_reload_s"] = image_s("reload")
    out["second_image_after_reload_s"] = image_s("reload_2")
    out["same_image_after"] = {k: compare(images["before"], v)["identical"] for k, v in images.items() if k != "before"}
    return out


# ------------------------------------------------------------------------------------------------ cold start
def run_cold_starts(args, settings, plan: Plan, assets: Assets, report: Report) -> None:
    """Process start to first image, in fresh processes: eager default, and regional compile with a cold and
    then a warm compile cache."""
    out = report.data["cold_start"]
    cache = plan.workdir / f"compile-cache-{os.getpid()}"
    runs = [("default, cold compile cache", {}, cache), ("default, warm compile cache", {}, cache),
            ("no-compile", VARIANTS["no-compile"], None)]
    for label, overrides, cache_dir in runs:
        if plan.left() < 90:
            out[label] = {"skipped": "time budget"}
            continue
        perf = dict(overrides or {})
        if cache_dir is not None:
            perf["compile_cache_dir"] = str(cache_dir)
        spec = {"config_dir": args.config_dir, "home": args.home, "models_root": args.models_root,
                "profile": args.profile, "assets": {"kind": assets.kind, "model_dir": str(assets.model_dir),
                                                    "controlnets": {k: str(v) for k, v in assets.controlnets.items()}},
                "performance": perf, "width": plan.width, "height": plan.height, "steps": plan.steps, "cfg": plan.cfg}
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        started = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "mcp_sdxl.bench", "--child", json.dumps(spec)],
                                  capture_output=True, text=True, env=env,
                                  timeout=max(60, min(400, plan.left() - 20)))
            line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode != 0 or not line:
                raise RuntimeError(f"child exited {proc.returncode}: {proc.stderr[-1500:]}")
            child = json.loads(line[-1])
            result = {k: round(v - started, 3) for k, v in child.pop("at").items()}
            result.update(child)
            result["process_start_to_first_image_s"] = result["first_image"]
            out[label] = result
            log.info("cold start %s: first image after %.1f s", label, result["first_image"])
        except Exception as exc:
            out[label] = {"error": report.error(f"cold_start/{label}", exc)}
        report.save()


def _child(spec_text: str) -> int:
    """A cold-start run in its own process: import, build the engine, load, generate twice; print times."""
    at = {}
    at["python_started"] = PROCESS_T0
    import torch  # noqa: F401

    from mcp_sdxl.config import load_settings
    from mcp_sdxl.engine import Engine

    at["imported"] = time.time()
    spec = json.loads(spec_text)
    settings = load_settings(spec["config_dir"], spec["home"], spec["models_root"], spec["profile"])
    a = spec["assets"]
    assets = Assets(a["kind"], Path(a["model_dir"]) if a["model_dir"] != "None" else None, None, {},
                    {k: Path(v) for k, v in a["controlnets"].items()})
    settings = engine_settings(settings, assets, spec["performance"] or None)
    engine = Engine(settings)
    at["engine_created"] = time.time()
    engine.load()
    at["loaded"] = time.time()
    plan = Plan("cuda", True, spec["width"], spec["height"], spec["steps"], spec["cfg"], 1, 0, False, [], None,
                Path("."), None, False)
    request = engine_request(plan, assets, {"loras": [], "controls": []})
    first = engine.generate(request)
    _sync()
    at["first_image"] = time.time()
    engine.generate(request)
    _sync()
    at["second_image"] = time.time()
    print(json.dumps({"at": at, "first_timings": first.timings,
                      "second_image_s": round(at["second_image"] - at["first_image"], 3)}))
    return 0


# ------------------------------------------------------------------------------------------------ main
def run_bench(args) -> int:
    from mcp_sdxl.config import load_settings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    settings = load_settings(args.config_dir, args.home, args.models_root, args.profile)
    cuda = torch.cuda.is_available() and settings.sdxl.hardware.device != "cpu"
    full = cuda and settings.sdxl.profile != "tiny"
    quick = bool(getattr(args, "quick", False))
    variants_text = getattr(args, "variants", None) or (
        DEFAULT_VARIANTS_CUDA if full and not quick else "default:base+loras3+cn1" if quick else "default:all")
    if full:
        width = height = 1024
        steps, cfg = 30, 7.5
    else:
        width = height = 64 if quick else 128
        steps, cfg = (3 if quick else 8), 7.0
    repeats = 1 if quick else max(1, args.repeats)
    warmups = 0 if quick else 1
    workdir = Path(getattr(args, "workdir", None) or (settings.home / "bench")).expanduser()
    plan = Plan("cuda" if cuda else "cpu", full, width, height, steps, cfg, repeats, warmups, quick,
                parse_variants(variants_text), getattr(args, "budget_s", None), workdir, args.vram_limit_gb,
                cold_start=full and not quick and not getattr(args, "no_cold_start", False))
    report = Report(Path(args.out).expanduser())
    meta = report.data["meta"]
    meta.update(command=" ".join(sys.argv), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=plan.device,
                size=[width, height], steps=steps, cfg=cfg, repeats=repeats, warmups=plan.warmups, quick=quick,
                variants=variants_text, vram_limit_gb=args.vram_limit_gb, tolerance=TOLERANCE, seed=SEED,
                prompt=PROMPT, python=platform.python_version(), torch=torch.__version__,
                scheduler="DPMSolverMultistepScheduler", weights_note=(
                    "random weights decode through the SDXL VAE config (force_upcast: float32 decode) like the "
                    "real model; random weights never overflow in fp16, real SDXL VAE weights do"))
    with contextlib.suppress(Exception):
        import compel
        import diffusers
        import peft
        import transformers

        meta.update(diffusers=diffusers.__version__, transformers=transformers.__version__, peft=peft.__version__,
                    compel=getattr(compel, "__version__", "?"))
    if cuda:
        meta["gpu"] = torch.cuda.get_device_name()
        meta["gpu_total_gib"] = _gib(torch.cuda.get_device_properties(0).total_memory)
    report.save()
    vram = Vram(cuda)
    if vram.nvml:
        meta["nvml_baseline_used_gib"] = _gib(vram.baseline)
    failed = False
    try:
        assets = prepare_assets(settings, plan, report)
        maps = control_images(width, height)
        if cuda and args.vram_limit_gb:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_limit_gb * 2**30 / total))
            meta["vram_limit_note"] = (f"torch allocator capped at {args.vram_limit_gb} GiB (reserved memory, "
                                       "set_per_process_memory_fraction); the CUDA context (~0.5 GiB) is outside it")
        wanted_ref = set()
        for _, scenarios, _ in plan.variants:
            wanted_ref |= set(scenarios)
        if getattr(args, "reference", None):
            wanted_ref = set(args.reference.split("+"))
        meta["reference_scenarios"] = sorted(wanted_ref)
        ref_images = run_reference(settings, plan, assets, maps, vram, report, wanted_ref)
        _free()
        report.data["reference"]["after_release"] = vram.now()
        for i, (name, scenarios, overrides) in enumerate(plan.variants):
            if plan.left() < 60:
                report.data["engine"][name] = {"skipped": "time budget"}
                continue
            run_engine_variant(settings, plan, assets, maps, vram, report, name, scenarios, overrides, ref_images,
                               main=(i == 0))
        if plan.cold_start:
            run_cold_starts(args, settings, plan, assets, report)
        _contact_sheet(ref_images, report)
    except SystemExit:
        raise
    except Exception as exc:
        report.error("bench", exc)
        failed = True
    finally:
        vram.close()
    meta["total_s"] = round(time.time() - PROCESS_T0, 1)
    summary = summarise(report.data, plan)
    report.data["targets"] = summary["targets"]
    report.save()
    text = render(report.data, summary)
    report.path.with_suffix(".md").write_text(text)
    print(text)
    failures = [e for e in report.data["errors"]]
    if args.vram_limit_gb and failures:
        return 1
    return 1 if failed else 0


def _contact_sheet(ref_images: dict, report: Report) -> None:
    """reference | engine (default variant) for the base scenario, side by side, next to the JSON."""
    if "base" not in ref_images or "_engine_base" not in ref_images:
        return
    from PIL import Image

    a, b = ref_images["base"], ref_images["_engine_base"]
    size = (256, 256 * a.height // a.width)
    sheet = Image.new("RGB", (size[0] * 2 + 8, size[1]), "white")
    sheet.paste(a.resize(size), (0, 0))
    sheet.paste(b.resize(size), (size[0] + 8, 0))
    sheet.save(report.path.with_suffix(".png"))


# ------------------------------------------------------------------------------------------------ summary
TARGETS = [("base", 1.2), ("loras3", 1.3), ("cn1", 1.8)]


def summarise(data: dict, plan: Plan) -> dict:
    targets = []
    engine = data.get("engine", {})
    default = engine.get(plan.variants[0][0], {}) if plan.variants else {}
    scen = default.get("scenarios", {}) if isinstance(default, dict) else {}
    if plan.full:
        for name, limit in TARGETS:
            value = scen.get(name, {}).get("median_s")
            targets.append({"target": f"{name} <= {limit} s/image", "value": value,
                            "met": value is not None and value <= limit})
        base, loras = scen.get("base", {}).get("median_s"), scen.get("loras3", {}).get("median_s")
        if base and loras:
            targets.append({"target": "3 LoRAs <= 10 % over base", "value": round(loras / base - 1, 4),
                            "met": loras / base - 1 <= 0.10})
        switch = default.get("lora_switch", {})
        if switch:
            worst = max((v.get("lora_s") or 0) for v in switch.values())
            targets.append({"target": "LoRA switch < 1 s", "value": worst, "met": worst < 1.0})
        peaks = [s.get("peak_reserved_gib") for v in engine.values() if isinstance(v, dict)
                 for s in v.get("scenarios", {}).values() if isinstance(s, dict) and s.get("peak_reserved_gib")]
        if peaks:
            targets.append({"target": "peak VRAM <= 15.5 GiB (torch reserved, every engine scenario)",
                            "value": max(peaks), "met": max(peaks) <= 15.5})
        cold = data.get("cold_start", {})
        for label, limit in (("default, cold compile cache", 60), ("default, warm compile cache", 30), ("no-compile", 30)):
            value = cold.get(label, {}).get("first_image") if isinstance(cold.get(label), dict) else None
            if value is not None:
                targets.append({"target": f"start to first image ({label}) <= {limit} s", "value": value,
                                "met": value <= limit})
    checks = [s.get("output_check", {}).get("pass") for v in engine.values() if isinstance(v, dict)
              for s in v.get("scenarios", {}).values() if isinstance(s, dict) and "output_check" in s]
    if checks:
        targets.append({"target": f"output check (mean |diff| <= {TOLERANCE['mean_abs_max']}/255, "
                                  f"PSNR >= {TOLERANCE['psnr_db_min']} dB) in every engine scenario",
                        "value": f"{sum(bool(c) for c in checks)}/{len(checks)} pass", "met": all(checks)})
    return {"targets": targets}


def render(data: dict, summary: dict) -> str:
    meta = data["meta"]
    lines = [f"# mcp-sdxl bench — {meta.get('gpu', meta.get('device'))}, {meta['size'][0]}x{meta['size'][1]}, "
             f"{meta['steps']} steps, weights: {data['setup'].get('weights')}", "",
             f"command: `{meta['command']}`", ""]
    ref = data.get("reference", {})
    lines += ["| engine variant | scenario | s/image (median) | first call s | vs reference | peak alloc GiB | "
              "peak reserved GiB | NVML peak GiB | output Δ mean/255 (PSNR) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("base", "loras3", "loras3_fused", "cn1", "cn2", "cn1_window"):
        r = ref.get(name)
        if isinstance(r, dict) and "median_s" in r:
            lines.append(f"| reference (plain diffusers) | {name} | {r['median_s']:.3f} | {r['first_call_s']:.3f} | 1.00 | "
                         f"{r.get('peak_allocated_gib', '')} | {r.get('peak_reserved_gib', '')} | "
                         f"{r.get('nvml_peak_used_gib', '')} | |")
    for variant, v in data.get("engine", {}).items():
        if not isinstance(v, dict):
            continue
        for name, s in v.get("scenarios", {}).items():
            if not isinstance(s, dict) or "median_s" not in s:
                lines.append(f"| {variant} | {name} | {s.get('error', s.get('skipped', '?'))[:80]} | | | | | | |")
                continue
            check = s.get("output_check", {})
            delta = f"{check['mean_abs']:.3f} ({check['psnr_db']})" if check else ""
            lines.append(f"| {variant} | {name} | {s['median_s']:.3f} | {s['first_call_s']:.3f} | "
                         f"{s.get('speedup_vs_reference', '')}x | {s.get('peak_allocated_gib', '')} | "
                         f"{s.get('peak_reserved_gib', '')} | {s.get('nvml_peak_used_gib', '')} | {delta} |")
    lines.append("")
    for variant, v in data.get("engine", {}).items():
        if isinstance(v, dict) and v.get("load_s") is not None:
            lines.append(f"- {variant}: load {v['load_s']} s; levers {v.get('levers_applied', {})}")
        if isinstance(v, dict) and v.get("lora_switch"):
            lines.append(f"  - LoRA switch: " + ", ".join(f"{k} {x['lora_s']} s" for k, x in v["lora_switch"].items()))
        if isinstance(v, dict) and isinstance(v.get("release"), dict) and "offload_s" in v["release"]:
            r = v["release"]
            lines.append(f"  - release: offload {r['offload_s']} s (VRAM after {r.get('after_offload')}), re-acquire "
                         f"{r.get('reacquire_from_cpu_s')} s, first image after {r.get('first_image_after_reacquire_s')} s; "
                         f"again: offload {r.get('offload_again_s')} s, re-acquire {r.get('reacquire_from_cpu_again_s')} s; "
                         f"unload {r.get('unload_s')} s (VRAM after {r.get('after_unload')}), reload "
                         f"{r.get('reload_from_disk_s')} s; same image after each: {r.get('same_image_after')}"
                         + (f"; error: {r['error'][:120]}" if r.get("error") else ""))
    if ref.get("encode_compel_s") is not None:
        lines.append(f"- prompt encoding: compel {ref['encode_compel_s']} s, diffusers encode_prompt "
                     f"{ref.get('encode_diffusers_s')} s; reference load {ref.get('load_s')} s")
    if ref.get("vae_decode_ms"):
        lines.append(f"- VAE decode ms: {ref['vae_decode_ms']}")
    for label, c in data.get("cold_start", {}).items():
        if isinstance(c, dict) and "first_image" in c:
            lines.append(f"- cold start {label}: imported {c.get('imported')} s, loaded {c.get('loaded')} s, first image "
                         f"{c['first_image']} s, second image took {c.get('second_image_s')} s")
        elif isinstance(c, dict):
            lines.append(f"- cold start {label}: {c.get('error', c.get('skipped'))}")
    if summary["targets"]:
        lines += ["", "| target | value | met |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |" for t in summary["targets"]]
    if data.get("errors"):
        lines += ["", f"errors: {len(data['errors'])}"] + [f"- {e['where']}: {e['error'][:300]}" for e in data["errors"]]
    lines.append(f"\ntotal {meta.get('total_s')} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        sys.exit(_child(sys.argv[2]))
    print("use: mcp-sdxl bench (see --help)", file=sys.stderr)
    sys.exit(2)
