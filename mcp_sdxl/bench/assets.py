"""Weights to benchmark: the configured SDXL, or full-size SDXL shapes with random weights, random LoRAs and ControlNets; the tiny engine on the CPU."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcp_sdxl.bench.plan import LORA_RANK, Plan, _free, _sync
from mcp_sdxl.bench.report import Report


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
    # an image to edit and upscale: colour gradients with shapes; the mask: its middle half
    grid_x, grid_y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    colours = np.stack([grid_x, grid_y, 1 - grid_x * grid_y], axis=-1) * 200 + 30
    source = Image.fromarray(colours.astype(np.uint8))
    draw = ImageDraw.Draw(source)
    for _ in range(8):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(width // 16, width // 5)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=255)
    return {"canny": edges, "depth": depth.filter(ImageFilter.GaussianBlur(2)), "source": source, "mask": mask}
