"""LoRA changes under the speed levers: peft's wrapper layers out of the hot path, fused QKV kept in step.

Every change of the active LoRAs (LoraManager.apply / unload_all) runs inside `lora_update`, installed by
`guard_lora_manager`: peft's wrappers are put back first (peft and diffusers see the model they built);
after the change, fused QKV weights are refreshed from the LoRA-fused to_q/to_k/to_v, wrappers that
compute nothing but their base layer are swapped out again (`strip_lora_wrappers`: no per-call Python
overhead, no recompiles, no graph invalidations), and the graph runners re-check what they captured.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

from mcp_sdxl.engine.accel import AccelState, state_of, wait_for_compiles

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@contextlib.contextmanager
def lora_update(pipe, fingerprint=None):
    """Wrap every change of the active LoRAs (LoraManager.apply / unload_all).

    Inside: peft's wrapper layers are back in place, so peft and diffusers see the model they built.
    After: fused QKV weights are refreshed from the (LoRA-fused) to_q/to_k/to_v, wrappers that compute
    nothing but their base layer are swapped out again (when strip_lora_wrappers is on), and graph runners
    re-check what they captured.
    """
    state = state_of(pipe)
    started = time.perf_counter()
    before = fingerprint() if fingerprint is not None else None
    changed = True
    reattach_lora_wrappers(state)
    timing = state.applied.setdefault("last_lora_update_s", {})
    timing["reattach"] = round(time.perf_counter() - started, 4)
    inner = time.perf_counter()
    try:
        yield
        changed = fingerprint is None or fingerprint() != before
    finally:
        timing["manager"] = round(time.perf_counter() - inner, 4)
        after = time.perf_counter()
        if state.fused_qkv:
            refresh_fused_qkv(pipe.unet)
        if state.strip_lora:
            strip_lora_wrappers(pipe, state)
        if changed:  # the same LoRAs again (most calls) leave graphs and compiled code as they were
            state.version += 1
        timing["refresh_and_strip"] = round(time.perf_counter() - after, 4)


def guard_lora_manager(manager, pipe):
    """Run every change the LoraManager makes (apply, unload_all) inside `lora_update(pipe)`."""
    for name in ("apply", "unload_all"):
        method = getattr(manager, name, None)
        if method is None or getattr(method, "_mcp_guarded", False):
            continue

        def guarded(*args, _method=method, _name=name, **kwargs):
            if _name == "apply" and not manager.changes(*args, **kwargs):
                return None  # the same LoRAs (most calls): the module tree stays as it is
            # A background compile traces this module tree and builds its guards from it at the end (dynamo,
            # measured on an H200: "'Linear' object has no attribute 'merged_adapters'" when the wrappers
            # were swapped mid-compile): a real change waits for it.
            wait_for_compiles(pipe)
            with lora_update(pipe, fingerprint=lambda: (manager.active, tuple(manager.loaded.items()))):
                return _method(*args, **kwargs)

        guarded._mcp_guarded = True
        functools.update_wrapper(guarded, method)
        setattr(manager, name, guarded)
    return manager


def is_identity_lora(module) -> bool:
    """True when this peft LoRA layer's forward is exactly `base_layer(x)` with the current weights."""
    from peft.tuners.lora.layer import LoraLayer

    if not isinstance(module, LoraLayer) or not hasattr(module, "base_layer"):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(module.base_layer, BaseTunerLayer):
        return False
    merged = bool(module.merged_adapters)
    if module.disable_adapters:
        return not merged  # disabled + merged would unmerge on the fly
    if merged:
        return True  # peft runs only the base layer once anything is merged
    return not any(name in module.lora_A for name in module.active_adapters)


def strip_lora_wrappers(pipe, state: AccelState | None = None) -> int:
    """Swap identity peft wrappers for their base layers; returns how many were swapped."""
    state = state or state_of(pipe)
    count = 0
    for component in LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        found = [(name, m) for name, m in model.named_modules() if is_identity_lora(m)]
        for name, wrapper in found:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, wrapper.base_layer)
            state.stripped.append((parent, child, wrapper))
            count += 1
    return count


def reattach_lora_wrappers(state: AccelState) -> int:
    count = 0
    while state.stripped:
        parent, child, wrapper = state.stripped.pop()
        if getattr(parent, child, None) is wrapper.base_layer:
            setattr(parent, child, wrapper)
            count += 1
    return count


def refresh_fused_qkv(unet) -> int:
    """Copy to_q/to_k/to_v (after LoRAs were fused into them) into the fused projections, in place."""
    from diffusers.models.attention_processor import Attention

    count = 0
    with torch.no_grad():
        for module in unet.modules():
            if not isinstance(module, Attention) or not getattr(module, "fused_projections", False):
                continue
            parts = ["to_k", "to_v"] if module.is_cross_attention else ["to_q", "to_k", "to_v"]
            target = module.to_kv if module.is_cross_attention else module.to_qkv
            weights = [_base(getattr(module, p)).weight for p in parts]
            target.weight.copy_(torch.cat(weights))
            if target.bias is not None:
                target.bias.copy_(torch.cat([_base(getattr(module, p)).bias for p in parts]))
            count += 1
    return count


def _base(layer):
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
