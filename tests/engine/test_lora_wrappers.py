"""LoRA changes under the speed levers (mcp_sdxl/engine/lora_wrappers.py), on the real tiny engine: with
peft's wrappers swapped out of the model and with fused QKV projections, every LoRA state makes the same
image as peft's own path, and each change puts the wrappers back first."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from mcp_sdxl.engine import LoraSpec, accel, lora_wrappers
from tests.engine.graph_helpers import tiny_engine


def _wrappers(pipe) -> int:
    return sum(isinstance(m, BaseTunerLayer) for c in lora_wrappers.LORA_COMPONENTS for m in getattr(pipe, c).modules())


def _image(engine, request, loras):
    return np.asarray(engine.generate(dataclasses.replace(request, loras=loras)).image).astype(int)


def test_stripped_wrappers_and_fused_qkv_make_the_images_peft_makes(tmp_path, tiny_cache):
    engine, request, _ = tiny_engine(tmp_path, tiny_cache)
    luca = [LoraSpec("character:luca", engine.lora_file("character", "luca"), 0.8)]
    both = luca + [LoraSpec("style:pixar_3d", engine.lora_file("style", "pixar_3d"), 0.6)]
    states = [luca, both, [], luca]
    want = [_image(engine, request, loras) for loras in states]  # peft's wrappers in place, separate Q/K/V
    assert np.abs(want[0] - want[2]).mean() > 1.0  # the LoRA changes the image (else nothing is tested)
    engine.loras.apply([])

    state = accel.state_of(engine.pipe)
    state.strip_lora = True  # what performance.strip_lora_wrappers does on CUDA
    engine.pipe.unet.fuse_qkv_projections()
    state.fused_qkv = True  # what performance.fuse_qkv does on CUDA
    got = []
    for loras, expected in zip(states, want):
        got.append(_image(engine, request, loras))
        assert _wrappers(engine.pipe) == 0  # fused LoRAs: every wrapper is out of the hot path
        assert np.abs(got[-1] - expected).max() <= 2  # fused QKV: float rounding only
    assert np.array_equal(got[0], got[3])  # back to the same LoRA: the same image

    engine.loras.apply(both)  # a change: the wrappers are back while peft works, then out again
    seen = []
    original = lora_wrappers.reattach_lora_wrappers

    def reattach(st):
        count = original(st)
        seen.append(_wrappers(engine.pipe))
        return count

    lora_wrappers.reattach_lora_wrappers = reattach
    try:
        engine.loras.apply(luca)
    finally:
        lora_wrappers.reattach_lora_wrappers = original
    assert seen and seen[0] > 0 and _wrappers(engine.pipe) == 0
    assert lora_wrappers.is_identity_lora(torch.nn.Linear(2, 2)) is False  # a plain layer is no wrapper
