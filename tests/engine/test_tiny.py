"""The offline SDXL assets: tiny pipeline, LoRAs, ControlNets, single-file checkpoints, full-size config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup would otherwise retry for ~23 s

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mcp_sdxl.engine.tiny import DEMO_CONTROLNETS, DEMO_LORAS, SDXL_BASE_CONFIG_DIR, build_tiny_sdxl, ensure_tiny_assets

PROMPT = "a photo of a cat"
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
SINGLE_FILE = "checkpoints/sdxl-tiny.safetensors"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ensure_tiny_assets(root, DEMO_LORAS, DEMO_CONTROLNETS, single_file=SINGLE_FILE)
    return root


@pytest.fixture(scope="module")
def pipe(root):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(root / "sdxl-tiny", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=1, size=64, output_type="np", **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        PROMPT, num_inference_steps=4, height=size, width=size, generator=generator, output_type=output_type, **kwargs
    ).images[0]


def mean_change(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def test_tiny_pipeline_is_deterministic_and_uses_sdpa(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    image = generate(pipe, seed=1)
    assert image.shape == (64, 64, 3)
    assert np.array_equal(image, generate(pipe, seed=1))
    assert mean_change(image, generate(pipe, seed=2)) > 0.05
    # not a flat or saturated picture, so LoRA / ControlNet changes stay measurable
    assert 0.1 < image.std() and ((image <= 0) | (image >= 1)).mean() < 0.05
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert pipe.text_encoder.config._attn_implementation == "sdpa"
    assert generate(pipe, size=128).shape == (128, 128, 3)


def test_build_is_byte_deterministic_and_idempotent(root, tmp_path):
    built = root / "sdxl-tiny"
    weights = sorted(p.relative_to(built) for p in built.rglob("*.safetensors"))
    assert len(weights) == 4
    marker = built / ".mcp-sdxl-tiny.json"
    before = marker.stat().st_mtime_ns
    assert build_tiny_sdxl(built) == built and marker.stat().st_mtime_ns == before  # skipped: already built
    again = build_tiny_sdxl(tmp_path / "again")
    for relative in weights:
        assert (again / relative).read_bytes() == (built / relative).read_bytes(), relative
    assert not [p for p in root.iterdir() if ".build-" in p.name or ".stale-" in p.name]


def test_single_file_loads_offline_with_identical_output(root, pipe):
    from diffusers import StableDiffusionXLPipeline

    single = StableDiffusionXLPipeline.from_single_file(
        str(root / SINGLE_FILE), config=str(root / "sdxl-tiny"), local_files_only=True
    )
    single.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(single, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert type(single.scheduler) is type(pipe.scheduler) and single.tokenizer_2.pad_token == "!"
    # Bit-identical weights; float outputs may differ by ~1e-7 only because memory-mapped tensors sit at
    # other alignments (BLAS summation order). The delivered 8-bit images are identical.
    assert np.array_equal(
        np.asarray(generate(pipe, output_type="pil")), np.asarray(generate(single, output_type="pil"))
    )
    np.testing.assert_allclose(generate(pipe), generate(single), atol=1e-5)


def test_from_pretrained_round_trip_is_identical(pipe, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe.save_pretrained(tmp_path / "copy")
    copy = StableDiffusionXLPipeline.from_pretrained(tmp_path / "copy", local_files_only=True)
    copy.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(pipe), generate(copy))


@pytest.mark.parametrize("relative", sorted(DEMO_LORAS))
def test_lora_files_load_and_change_the_image(root, pipe, relative):
    from safetensors import safe_open

    path = root / relative
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if DEMO_LORAS[relative]["fmt"] == "kohya":
        assert any(k.startswith("lora_unet_input_blocks_") and k.endswith(".lora_down.weight") for k in keys)
        assert any(k.endswith(".alpha") for k in keys)
    else:
        assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys)
    assert any(k.startswith(("lora_te1_", "text_encoder.")) for k in keys) == bool(
        DEMO_LORAS[relative].get("text_encoder")
    )

    base = generate(pipe)
    pipe.load_lora_weights(str(path), adapter_name="under_test")
    try:
        pipe.set_adapters(["under_test"], [1.0])
        full = generate(pipe)
        pipe.set_adapters(["under_test"], [0.5])
        half = generate(pipe)
    finally:
        pipe.delete_adapters(["under_test"])
    assert 0.01 < mean_change(full, base) < 0.15  # visible, not blown up
    assert 0 < mean_change(half, base) < mean_change(full, base)
    # deleting restores the base model's image within float rounding: on some CPUs the image after a LoRA
    # run differs by 7.5e-7 even with every weight equal and plain Linear layers back (unload_lora_weights),
    # where the LoRA itself moves pixels by 0.01-0.15
    assert np.abs(generate(pipe) - base).max() < 1e-5


def test_text_encoder_lora_changes_both_prompt_embeddings(root, pipe):
    base_embeds, _, base_pooled, _ = pipe.encode_prompt(PROMPT)
    pipe.load_lora_weights(str(root / "loras/pixar_style.safetensors"), adapter_name="te")
    try:
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT)
    finally:
        pipe.delete_adapters(["te"])
    width_1 = pipe.text_encoder.config.hidden_size  # SDXL concatenates encoder 1 then encoder 2
    assert not torch.allclose(embeds[..., :width_1], base_embeds[..., :width_1])
    assert not torch.allclose(embeds[..., width_1:], base_embeds[..., width_1:])
    assert not torch.allclose(pooled, base_pooled)


def test_controlnet_steers_the_image(root, pipe):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    controlnet = ControlNetModel.from_pretrained(root / DEMO_CONTROLNETS["openpose"], local_files_only=True)
    control = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    disc, bar = Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64))
    ImageDraw.Draw(disc).ellipse((16, 16, 48, 48), fill="white")
    ImageDraw.Draw(bar).rectangle((4, 28, 60, 36), fill="white")

    base = generate(pipe)
    with_disc = generate(control, image=disc)
    assert np.array_equal(generate(control, image=disc, controlnet_conditioning_scale=0.0), base)
    assert 0.01 < mean_change(with_disc, base) < 0.15
    assert mean_change(with_disc, generate(control, image=bar)) > 0.005  # the control image matters
    other = ControlNetModel.from_pretrained(root / DEMO_CONTROLNETS["depth"], local_files_only=True)
    assert not torch.equal(other.controlnet_mid_block.weight, controlnet.controlnet_mid_block.weight)


def test_concurrent_builders_do_not_collide(tmp_path):
    # Two processes racing on an empty root: both must return a complete, identical asset set.
    code = (
        "import sys; from mcp_sdxl.engine.tiny import ensure_tiny_assets as e; "
        "e(sys.argv[1], {'l.safetensors': {'fmt': 'kohya'}}, {'canny': 'cn'})"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    workers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env) for _ in range(2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert names == ["cn", "l.safetensors", "sdxl-tiny"]


def test_full_size_config_matches_sdxl_base():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(model) -> int:
        return sum(p.numel() for p in model.parameters())

    with init_empty_weights():  # meta device: no memory for 3.5 B parameters
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SDXL_BASE_CONFIG_DIR, subfolder="unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_BASE_CONFIG_DIR, subfolder="vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG_DIR, subfolder="text_encoder"))
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG_DIR, subfolder="text_encoder_2")
        )
    assert next(unet.parameters()).device.type == "meta"
    assert count(unet) == 2_567_463_684
    assert (count(vae), count(te), count(te2)) == (83_653_863, 123_060_480, 694_659_840)
    index = json.loads((SDXL_BASE_CONFIG_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert sum(f.stat().st_size for f in SDXL_BASE_CONFIG_DIR.rglob("*") if f.is_file()) < 4_000_000


def test_shipped_tokenizers_tokenize_like_clip():
    from transformers import CLIPTokenizer

    from mcp_sdxl.engine.clip_vocab import build_vocab

    for name, pad, pad_id in (("tokenizer", "<|endoftext|>", 49407), ("tokenizer_2", "!", 0)):
        tokenizer = CLIPTokenizer.from_pretrained(SDXL_BASE_CONFIG_DIR, subfolder=name)
        assert tokenizer(PROMPT).input_ids == CAT_IDS
        assert (len(tokenizer), tokenizer.model_max_length) == (49408, 77)
        assert (tokenizer.pad_token, tokenizer.pad_token_id) == (pad, pad_id)
        padded = tokenizer(PROMPT, padding="max_length", max_length=77).input_ids
        assert padded[:7] == CAT_IDS and set(padded[7:]) == {pad_id}
    # The committed vocab.json is exactly what CLIP derives from the committed merges.
    folder = SDXL_BASE_CONFIG_DIR / "tokenizer"
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert len(merges) == 48_894
    assert build_vocab(merges) == json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
