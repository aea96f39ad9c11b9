"""ControlNets: lazy loading per control type, multi-ControlNet pipelines, no work outside the window.

The control pipeline is built from the base pipeline's components, so it shares every weight with it
(and its fused LoRAs). All requests go through MultiControlNetModel, one net per control type.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from mcp_sdxl.engine.loading import WeightSource, inference_only, load_controlnet, own_memory, resolve_source
from mcp_sdxl.errors import UserInputError

log = logging.getLogger(__name__)

CONTROL_TYPES = ("openpose", "depth", "canny")


def controlnet_source(engine, kind: str) -> WeightSource | None:
    """Where the ControlNet for `kind` comes from, or None when none is configured/found."""
    if engine.profile == "tiny":
        from mcp_sdxl.engine import tiny

        return WeightSource("folder", str(tiny.ensure_tiny_controlnet(engine.settings.tiny_dir, kind)))
    entry = engine.settings.controlnet.controlnets.get(kind)
    if entry is None:
        return None
    return resolve_source(entry.model, engine.settings.models_root, entry.cache_dir)


def _require_source(engine, kind: str) -> WeightSource:
    """The source for `kind`, or a UserInputError saying why there is none. Loads nothing."""
    if kind not in CONTROL_TYPES:
        raise UserInputError(f"unknown control type {kind!r}; use one of {', '.join(CONTROL_TYPES)}")
    source = controlnet_source(engine, kind)
    if source is None:
        entry = engine.settings.controlnet.controlnets.get(kind)
        where = f"model {entry.model!r} was not found locally" if entry else "no model is configured"
        raise UserInputError(
            f"no ControlNet for {kind}: {where} (controlnet_config.yaml). "
            f"Use another control type or configure a local ControlNet model for {kind}."
        )
    return source


def get_controlnet(engine, kind: str) -> torch.nn.Module:
    if kind in engine.controlnets:
        return engine.controlnets[kind]
    source = _require_source(engine, kind)
    entry = engine.settings.controlnet.controlnets.get(kind)
    model = inference_only(load_controlnet(source, engine.dtype, entry.cache_dir if entry else None))
    model.to(engine.device)
    if engine.device.type == "cpu":
        own_memory(model)
    from mcp_sdxl.engine.accel import optimize_controlnet

    optimize_controlnet(engine.pipe, model, engine.settings.sdxl.performance, engine.device)  # CUDA only
    if engine.device.type == "cuda":
        # the layout change freed the contiguous copy of every weight (2.3 GiB for a full SDXL ControlNet):
        # cached for the serving stream, it sat reserved beside the graphs' pool (+0.6 GiB with two, H200)
        torch.cuda.empty_cache()
    engine.controlnets[kind] = model
    return model


def prepare(engine, request):
    """The control pipeline and its extra call arguments for `request.controls`."""
    from diffusers import StableDiffusionXLControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    if not 0.0 <= request.control_start < request.control_end <= 1.0:
        raise UserInputError(
            f"control_start ({request.control_start}) must be below control_end ({request.control_end}), both in [0, 1]"
        )
    # Check every requested type before loading any, and drop what this call loaded if a later one
    # fails: a bad request never leaves a ControlNet behind in (V)RAM.
    for c in request.controls:
        if c.kind not in engine.controlnets:
            _require_source(engine, c.kind)
    loaded_here = []
    try:
        nets = []
        for c in request.controls:
            if c.kind not in engine.controlnets:
                loaded_here.append(c.kind)
            nets.append(get_controlnet(engine, c.kind))
    except BaseException:
        for kind in loaded_here:
            engine.controlnets.pop(kind, None)
        raise
    from mcp_sdxl.engine.accel import control_pipeline

    # not from_pipe: diffusers' from_pipe casts every shared component (the base pipeline's too) to float32
    pipe = control_pipeline(StableDiffusionXLControlNetPipeline, engine.pipe, MultiControlNetModel(nets))
    pipe.set_progress_bar_config(disable=True)
    n = len(nets)
    extra = {
        "image": [c.image for c in request.controls],
        "controlnet_conditioning_scale": [float(c.strength) for c in request.controls],
        "control_guidance_start": [float(request.control_start)] * n,
        "control_guidance_end": [float(request.control_end)] * n,
    }
    return pipe, extra


@contextlib.contextmanager
def skip_outside_window(pipe):
    """Run no ControlNet whose scale is 0 at this step.

    diffusers keeps calling every ControlNet outside [control_guidance_start, control_guidance_end]
    (and at strength 0) with scale 0; the result is multiplied away. Skipping those calls is free
    speed. With nothing left to run, the UNet gets no residuals, exactly as without ControlNet.
    """
    multi = getattr(pipe, "controlnet", None)
    if multi is None or not hasattr(multi, "nets"):
        yield
        return

    def forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, **kwargs):
        down, mid = None, None
        for image, scale, net in zip(controlnet_cond, conditioning_scale, multi.nets):
            if scale == 0:
                continue
            d, m = net(sample, timestep, encoder_hidden_states, image, scale, **kwargs)
            if down is None:
                down, mid = list(d), m
            else:
                down = [a + b for a, b in zip(down, d)]
                mid = mid + m
        return down, mid

    multi.forward = forward
    try:
        yield
    finally:
        del multi.forward
