"""LoRA composition in the engine (issue 3), on the tiny profile with real LoRA files in both formats.

The tiny profile builds one LoRA per registry entry: characters in diffusers/peft format, backgrounds in
Kohya format (UNet only), styles in Kohya format that also trains both text encoders.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mcp_sdxl.config import load_settings
from mcp_sdxl.engine import Engine, GenerationRequest, LoraSpec
from mcp_sdxl.errors import UserInputError
from tests.conftest import CONFIGS

ADAPTERS = {  # registry entry -> (file format, text-encoder layers)
    ("character", "luca"): ("diffusers", False),
    ("background", "portorosso"): ("kohya", False),
    ("style", "pixar_3d"): ("kohya", True),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and on a busy 2-core machine OpenMP's
    spinning workers made each 64x64 image ~13x slower (4.9 s instead of 0.37 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def request(**overrides) -> GenerationRequest:
    values = {"prompt": "a boy on a beach, red scarf", "width": 64, "height": 64, "steps": 3, "cfg_scale": 7.0}
    values["seed"] = 1
    return GenerationRequest(**{**values, **overrides})


def pixels(engine: Engine, loras=(), **overrides) -> np.ndarray:
    return np.asarray(engine.generate(request(loras=list(loras), **overrides)).image, dtype=np.float32) / 255.0


def mean_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_cache):
    home = tmp_path_factory.mktemp("lora-home")
    (home / "tiny").symlink_to(tiny_cache, target_is_directory=True)
    return load_settings(CONFIGS, home=home, profile="tiny")


@pytest.fixture(scope="module")
def engine(settings) -> Engine:
    """One engine for the module: every test also checks that what ran before it left nothing behind."""
    return Engine(settings)


@pytest.fixture(scope="module")
def base(settings) -> np.ndarray:
    """A FRESH engine's image without LoRAs (never touched by an adapter)."""
    return pixels(Engine(settings))


def spec(engine: Engine, kind: str, name: str, weight: float) -> LoraSpec:
    return LoraSpec(f"{kind}:{name}", engine.lora_file(kind, name), weight)


@pytest.mark.parametrize(("kind", "name"), list(ADAPTERS), ids=[k for k, _ in ADAPTERS])
def test_each_adapter_changes_the_image_in_proportion_to_its_weight(engine, base, kind, name):
    fmt, text_encoder = ADAPTERS[kind, name]
    with safe_open(str(engine.lora_file(kind, name)), framework="pt") as handle:
        keys = list(handle.keys())
    if fmt == "kohya":  # the Civitai/A1111 layout, as downloaded
        assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    else:
        assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys)
    assert any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys) == text_encoder

    assert np.array_equal(pixels(engine), base)  # whatever ran before left the engine clean
    assert np.array_equal(pixels(engine, [spec(engine, kind, name, 0.0)]), base)  # weight 0 == no LoRA, exactly
    images = {w: pixels(engine, [spec(engine, kind, name, w)]) for w in (0.25, 0.5, 1.0)}
    distances = [mean_change(images[w], base) for w in (0.25, 0.5, 1.0)]
    assert 0.003 < distances[0] < distances[1] < distances[2] < 0.2, distances  # visible, monotone, not blown up
    assert engine.loras.active == ((f"{kind}_{name}", 1.0),)
    again = pixels(engine, [spec(engine, kind, name, 1.0)], seed=2)
    assert np.array_equal(pixels(engine, [spec(engine, kind, name, 1.0)]), images[1.0])  # same seed, same image
    assert mean_change(again, images[1.0]) > 0.05
    assert np.array_equal(pixels(engine, [spec(engine, kind, name, 0.5)]), images[0.5])  # re-fused from clean
    assert np.array_equal(pixels(engine), base)


def test_weight_zero_in_a_stack_equals_leaving_it_out(engine):
    luca = spec(engine, "character", "luca", 0.8)
    zeros = [spec(engine, "style", "pixar_3d", 0.0), spec(engine, "background", "portorosso", 0)]
    with_zero = pixels(engine, [luca, *zeros])
    assert np.array_equal(with_zero, pixels(engine, [luca]))


def test_switching_adapter_sets_does_not_drift(settings, base):
    engine = Engine(settings)  # A's first image is made before B was ever loaded
    a = [spec(engine, "character", "luca", 0.8)]
    b = [spec(engine, "style", "pixar_3d", 0.7), spec(engine, "background", "portorosso", 0.6)]
    first_a = pixels(engine, a)
    first_b = pixels(engine, b)
    assert mean_change(first_a, first_b) > 0.01 and mean_change(first_a, base) > 0.01
    for _ in range(2):
        assert np.array_equal(pixels(engine, a), first_a)  # no drift from fuse/unfuse, no leak of B's text LoRA
        assert np.array_equal(pixels(engine, b), first_b)
    both = pixels(engine, a + b)
    assert min(mean_change(both, first_a), mean_change(both, first_b)) > 0.005  # they compose
    assert np.array_equal(pixels(engine, list(reversed(a + b))), both)  # order does not matter
    assert np.array_equal(pixels(engine), base)
    assert engine.loras.active == () and set(engine.loras.loaded) == {
        "character_luca", "style_pixar_3d", "background_portorosso"
    }


def test_text_encoder_lora_changes_both_encoders_and_is_undone(engine):
    prompt = "a boy on a beach, red scarf"
    engine.load()
    engine.loras.apply([])
    plain = engine._encode(prompt, "")
    engine.loras.apply([spec(engine, "style", "pixar_3d", 1.0)])
    styled = engine._encode(prompt, "")
    width_1 = engine.pipe.text_encoder.config.hidden_size  # SDXL concatenates encoder 1, then encoder 2
    assert not torch.allclose(styled["prompt_embeds"][..., :width_1], plain["prompt_embeds"][..., :width_1])
    assert not torch.allclose(styled["prompt_embeds"][..., width_1:], plain["prompt_embeds"][..., width_1:])
    assert not torch.allclose(styled["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])
    engine.loras.apply([spec(engine, "character", "luca", 1.0)])  # UNet-only adapter: text back to plain
    restored = engine._encode(prompt, "")
    assert all(torch.equal(restored[k], plain[k]) for k in plain)


def test_long_and_weighted_prompts(engine, base):
    head = "a boy on a beach, " + ", ".join(["blue sky"] * 40)  # 120+ tokens: two CLIP windows
    long_a, long_b = head + ", red scarf", head + ", green hat"
    engine.load()
    tokenizers = (engine.pipe.tokenizer, engine.pipe.tokenizer_2)
    assert all(len(t(long_a).input_ids) > 77 for t in tokenizers)
    embeds_a, embeds_b = engine._encode(long_a, ""), engine._encode(long_b, "")
    assert embeds_a["prompt_embeds"].shape[1] == 154 == embeds_a["negative_prompt_embeds"].shape[1]
    changed = torch.nonzero((embeds_a["prompt_embeds"] - embeds_b["prompt_embeds"]).abs().sum(-1)[0]).flatten()
    assert changed.min() > 77  # the words past the first window reach the UNet (not truncated) ...
    image_a = pixels(engine, prompt=long_a)
    assert not np.array_equal(image_a, pixels(engine, prompt=long_b))  # ... and change the image
    assert np.array_equal(image_a, pixels(engine, prompt=long_a))
    # compel weighting changes the conditioning and the picture, deterministically
    plain = pixels(engine, prompt="a boy, red scarf, hat")
    weighted = pixels(engine, prompt="a boy, (red scarf)1.4, hat++")
    assert mean_change(weighted, plain) > 1e-3
    assert np.array_equal(weighted, pixels(engine, prompt="a boy, (red scarf)1.4, hat++"))
    assert mean_change(pixels(engine, prompt="a boy, red scarf, hat--"), plain) > 1e-4
    # with a text-encoder LoRA active, long and weighted prompts still run through both encoders
    style = [spec(engine, "style", "pixar_3d", 0.7)]
    assert mean_change(pixels(engine, style, prompt=long_a), image_a) > 0.005


@pytest.mark.parametrize("weight", [1.5, -0.1, float("nan"), float("inf"), "0.5", True])
def test_weight_outside_unit_interval_or_not_a_number_is_refused_before_anything_changes(engine, weight):
    luca = spec(engine, "character", "luca", 0.8)
    before = pixels(engine, [luca])
    with pytest.raises(UserInputError, match=r"LoRA weight for style:pixar_3d must be a number in \[0, 1\]"):
        pixels(engine, [luca, spec(engine, "style", "pixar_3d", weight)])
    assert engine.loras.active == (("character_luca", 0.8),)  # untouched: still fused, same image
    assert np.array_equal(pixels(engine, [luca]), before)


# ---------------------------------------------------------------------------------------- bad files
def bad_lora(tmp_path: Path, engine: Engine, case: str) -> Path:
    path = tmp_path / f"{case}.safetensors"
    if case == "missing":
        return path
    if case == "random_bytes":
        path.write_bytes(os.urandom(4096))
    elif case == "foreign_keys":  # a valid safetensors file, but not a LoRA at all
        save_file({"model.weight": torch.randn(8, 8), "model.bias": torch.randn(8)}, str(path))
    elif case == "unmatched_modules":  # LoRA-shaped keys for modules this model does not have (e.g. SD 1.5)
        save_file({
            "lora_unet_not_a_block_proj.lora_down.weight": torch.randn(4, 32),
            "lora_unet_not_a_block_proj.lora_up.weight": torch.randn(32, 4),
            "lora_unet_not_a_block_proj.alpha": torch.tensor(4.0),
        }, str(path))
    elif case == "wrong_shapes_late":  # UNet part loads, the second text encoder's part does not: half-loaded
        tensors = load_file(str(engine.lora_file("style", "pixar_3d")))
        last = max(k for k in tensors if k.startswith("lora_te2_") and k.endswith("lora_up.weight"))
        tensors[last] = torch.randn(5, 9, dtype=tensors[last].dtype)
        save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("case", ["missing", "random_bytes", "foreign_keys", "unmatched_modules", "wrong_shapes_late"])
def test_bad_lora_file_is_a_clear_error_and_leaves_the_engine_clean(engine, base, tmp_path, case):
    path = bad_lora(tmp_path, engine, case)
    style = spec(engine, "style", "pixar_3d", 0.7)
    styled = pixels(engine, [style])  # something fused, so the failure has state to spoil
    with pytest.raises(UserInputError) as caught:
        pixels(engine, [style, LoraSpec("character:broken", path, 0.8)])
    message = str(caught.value)
    assert str(path) in message and "character:broken" in message
    assert ("could not be loaded" in message) == (case != "missing")  # says which problem it is
    adapters = {name for names in engine.pipe.get_list_adapters().values() for name in names}
    assert "character_broken" not in adapters and "character_broken" not in engine.loras.loaded
    assert np.array_equal(pixels(engine), base)  # == a fresh engine's output
    assert np.array_equal(pixels(engine, [style]), styled)  # the good adapter still works as before


def test_first_lora_ever_broken_leaves_a_working_engine(settings, base, tmp_path):
    """A fresh engine whose very first LoRA file is bad (no adapter in the model yet): the error is the
    file's, and the next good LoRA, and no LoRA, work as on any engine."""
    engine = Engine(settings)
    path = bad_lora(tmp_path, engine, "random_bytes")
    with pytest.raises(UserInputError, match="could not be loaded"):
        pixels(engine, [LoraSpec("character:broken", path, 0.8)])
    assert np.array_equal(pixels(engine), base)
    style = spec(engine, "style", "pixar_3d", 0.7)
    assert mean_change(pixels(engine, [style]), base) > 0.01 and np.array_equal(pixels(engine), base)
