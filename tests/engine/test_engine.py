"""The SDXL engine on the tiny profile (issue 2): real diffusers pipelines, images compared with numpy.

Generation, determinism, quality presets, size validation (through the Planner), SDPA, the three ways
of loading weights (diffusers folder, single .safetensors file with a config folder, hub id from a local
Hugging Face cache; all offline, all giving the folder's exact image), unload, and the learned estimate.
"""

from __future__ import annotations

import gc
import math
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from mcp_sdxl.config import load_settings
from mcp_sdxl.engine import Engine, GenerationRequest
from mcp_sdxl.errors import ConfigError, UserInputError
from mcp_sdxl.studio.planning import Planner
from tests.conftest import CONFIGS

SIZE = 64  # the smallest size the tiny UNet takes: every image here costs ~0.1 s on a CPU


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and on a busy 2-core machine OpenMP's
    spinning workers made each 64x64 image ~13x slower (4.9 s instead of 0.37 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def request(**overrides) -> GenerationRequest:
    values = {"prompt": "a boy on a beach, red scarf", "width": SIZE, "height": SIZE, "steps": 3, "cfg_scale": 7.0}
    values["seed"] = 1
    return GenerationRequest(**{**values, **overrides})


def pixels(engine: Engine, **overrides) -> np.ndarray:
    return np.asarray(engine.generate(request(**overrides)).image, dtype=np.float32) / 255.0


def mean_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def tiny_settings(home: Path, profile: str = "tiny", **model):
    settings = load_settings(CONFIGS, home=home, profile=profile)
    if model:
        settings.sdxl.model = settings.sdxl.model.model_copy(update=model)
    return settings


@pytest.fixture(scope="module")
def module_home(tmp_path_factory, tiny_cache) -> Path:
    home = tmp_path_factory.mktemp("engine-home")
    (home / "tiny").symlink_to(tiny_cache, target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def engine(module_home) -> Engine:
    return Engine(tiny_settings(module_home))


@pytest.fixture(scope="module")
def reference(engine) -> np.ndarray:
    """The tiny engine's image for request(): what every other way of loading the same weights must give."""
    return pixels(engine)


def test_generation_is_deterministic_and_seed_sensitive(engine, reference):
    output = engine.generate(request())
    assert output.image.size == (SIZE, SIZE) and output.image.mode == "RGB"
    assert {"load_s", "lora_s", "encode_s", "denoise_s", "decode_s"} <= set(output.timings)
    image = np.asarray(output.image, dtype=np.float32) / 255.0
    assert np.array_equal(image, reference)  # same seed and parameters: the same image, bit for bit
    assert image.std() > 0.05  # a real picture, not a flat one, so differences below are meaningful
    assert mean_change(pixels(engine, seed=2), reference) > 0.05
    assert mean_change(pixels(engine, prompt="a cat in the snow"), reference) > 0.001
    assert engine.generate(request(width=96, height=64)).image.size == (96, 64)
    assert engine.status()["state"] == "ready" and engine.status()["profile"] == "tiny"


def test_sdpa_is_the_attention_everywhere(engine, reference):
    assert engine.attention_backends() == {
        "unet": ["AttnProcessor2_0"],
        "vae": ["AttnProcessor2_0"],
        "text_encoder": ["sdpa"],
        "text_encoder_2": ["sdpa"],
    }


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("sdxl", {"draft": (20, 7.0), "standard": (30, 7.5), "high": (40, 8.0)}),
        # tiny: steps x steps_scale 0.25 (rounded, at least 2); cfg unchanged
        ("tiny", {"draft": (5, 7.0), "standard": (8, 7.5), "high": (10, 8.0)}),
    ],
)
def test_quality_presets_map_to_steps_and_cfg(module_home, profile, expected):
    planner = Planner(tiny_settings(module_home), profile)
    for quality, (steps, cfg) in expected.items():
        plan = planner.plan(kind="control", character=None, scene_description="a boat", quality=quality, seed=1)
        assert (plan.steps, plan.cfg_scale) == (steps, cfg), quality
    assert planner.plan(kind="control", character=None, scene_description="a boat", seed=1).quality == "standard"
    # luca's preset (steps 35, cfg 7.5) refines 'standard' only; draft and high stay what they say
    luca = {q: planner.plan(kind="character", character="luca", scene_description="x", quality=q, seed=1)
            for q in expected}
    assert (luca["standard"].steps, luca["standard"].cfg_scale) == ((35, 7.5) if profile == "sdxl" else (9, 7.5))
    assert (luca["draft"].steps, luca["draft"].cfg_scale) == expected["draft"]
    assert (luca["high"].steps, luca["high"].cfg_scale) == expected["high"]
    explicit = planner.plan(kind="control", character=None, scene_description="x", steps=3, cfg_scale=2.5, seed=1)
    assert (explicit.steps, explicit.cfg_scale) == (3, 2.5)
    with pytest.raises(UserInputError, match="draft, standard, high"):
        planner.plan(kind="control", character=None, scene_description="x", quality="ultra")


def test_engine_runs_the_planned_number_of_steps(engine, module_home):
    plan = Planner(tiny_settings(module_home), "tiny").plan(
        kind="control", character=None, scene_description="a boat", quality="draft", width=SIZE, height=SIZE, seed=3
    )
    seen = []
    planned = request(steps=plan.steps, cfg_scale=plan.cfg_scale, seed=plan.seeds[0])
    engine.generate(planned, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 5) for i in range(1, 6)]


@pytest.mark.parametrize(
    ("profile", "good", "bad"),
    [
        ("sdxl", [(1024, 1024), (256, 2048), (1000, 768), (832, 1216)],
         [(1001, 1024), (248, 1024), (1024, 2056), (1024.5, 1024), ("1024", 1024), (True, 1024), (float("nan"), 512)]),
        ("tiny", [(64, 64), (96, 160), (128, 128)], [(80, 64), (32, 64), (64, 100), (0, 64), (-64, 64)]),
    ],
)
def test_sizes_are_validated_by_the_planner(module_home, profile, good, bad):
    planner = Planner(tiny_settings(module_home), profile)

    def plan(width, height):
        return planner.plan(kind="control", character=None, scene_description="x", width=width, height=height, seed=1)

    for width, height in good:
        assert (plan(width, height).width, plan(width, height).height) == (width, height)
    for width, height in bad:
        with pytest.raises(UserInputError, match="width|height"):
            plan(width, height)
    default = plan(None, None)
    assert (default.width, default.height) == ((1024, 1024) if profile == "sdxl" else (128, 128))


def test_pixel_cap_is_enforced(module_home):
    settings = tiny_settings(module_home)
    settings.sdxl.generation.limits.max_pixels = 1024 * 768
    planner = Planner(settings, "sdxl")
    assert planner.plan(kind="control", character=None, scene_description="x", width=1024, height=768, seed=1)
    with pytest.raises(UserInputError, match="pixel limit"):
        planner.plan(kind="control", character=None, scene_description="x", width=1024, height=1024, seed=1)


# ---------------------------------------------------------------------------------------- loading
def hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """A Hugging Face cache laid out as `huggingface_hub` writes it: models--org--name/snapshots/<hash>, refs/main."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision, ignore=shutil.ignore_patterns(".*"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


@pytest.mark.parametrize("kind", ["folder", "single_file", "hub_cache_dir", "hub_env_cache"])
def test_sdxl_profile_loads_every_source_offline_with_the_same_image(
    kind, module_home, tiny_cache, tmp_path, reference, monkeypatch
):
    from mcp_sdxl.engine.tiny import save_single_file

    tiny_folder = tiny_cache / "sdxl-tiny"
    if kind == "folder":
        model = {"base_model": str(tiny_folder)}
    elif kind == "single_file":
        # Civitai-style checkpoint: original (SGM/LDM) key names; configs from `single_file_config`
        checkpoint = save_single_file(tiny_folder, tmp_path / "checkpoints" / "tiny.safetensors")
        model = {"base_model": str(checkpoint), "single_file_config": str(tiny_folder)}
    elif kind == "hub_cache_dir":
        cache = hub_cache(tmp_path / "hf", "acme/sdxl-tiny", tiny_folder)
        model = {"base_model": "acme/sdxl-tiny", "cache_dir": str(cache)}
    else:  # the default cache location (HF_HUB_CACHE) rather than an explicit cache_dir
        import huggingface_hub.constants

        cache = hub_cache(tmp_path / "hf", "acme/sdxl-tiny", tiny_folder)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import time
        model = {"base_model": "acme/sdxl-tiny", "cache_dir": None}
    # variant fp16 is the shipped default; the tiny weights have none, so loading must fall back
    engine = Engine(tiny_settings(module_home, profile="sdxl", variant="fp16", **model))
    assert engine.profile == "sdxl"
    assert engine.source.kind == {"folder": "folder", "single_file": "single_file"}.get(kind, "hub")
    image = pixels(engine)
    assert engine.attention_backends()["unet"] == ["AttnProcessor2_0"]
    assert np.array_equal(image, reference)


def test_hub_id_missing_from_the_cache_is_reported_not_downloaded(module_home, tmp_path):
    settings = tiny_settings(module_home, profile="sdxl", base_model="acme/not-there", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"sdxl_config\.yaml.*acme/not-there"):
        Engine(settings)
    auto = tiny_settings(module_home, profile="auto", base_model="acme/not-there", cache_dir=str(tmp_path))
    assert Engine(auto).profile == "tiny"  # auto falls back to the built-in engine


# ---------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("prompt", [
    "a boy on a beach, red scarf",
    "a boy on a beach, (red scarf)1.4, sea--",
    '("a boy on a beach", "a lighthouse").blend(0.7, 0.3)',
    "",
])
def test_prompt_parse_cache_gives_compels_own_embeddings(engine, prompt):
    """The engine parses each prompt string once (compel re-parses it per text encoder, ~60 ms each):
    the embeddings are exactly those of an uncached compel, and weighting syntax still weighs."""
    from compel import CompelForSDXL

    engine.load()
    fresh = CompelForSDXL(engine.pipe, device=engine.device)
    with torch.inference_mode():
        want = fresh(prompt, negative_prompt="blurry")
    for _ in range(2):  # the second call is served from the cache
        got = engine._encode(prompt, "blurry")
        assert torch.equal(got["prompt_embeds"], want.embeds)
        assert torch.equal(got["pooled_prompt_embeds"], want.pooled_embeds)
        assert torch.equal(got["negative_prompt_embeds"], want.negative_embeds)
    plain = engine._encode("a boy on a beach, red scarf", "blurry")["prompt_embeds"]
    if "(" in prompt:
        assert not torch.equal(got["prompt_embeds"][:, : plain.shape[1]], plain)


def test_parsed_prompts_are_copies():
    from mcp_sdxl.engine.engine import parse_prompt

    first = parse_prompt("a (red)1.3 scarf")
    first.prompts.clear()  # a caller changing what it got does not change what the next caller gets
    again = parse_prompt("a (red)1.3 scarf")
    assert again.prompts and [f.weight for f in again.prompts[0].children] == [1.0, 1.3, 1.0]


# ---------------------------------------------------------------------------------------- residency
def test_unload_frees_everything_and_reload_gives_the_same_image(module_home, reference):
    engine = Engine(tiny_settings(module_home))
    assert np.array_equal(pixels(engine), reference)
    assert engine.state == "ready" and engine.pipe is not None
    unet = weakref.ref(engine.pipe.unet)
    text_encoder = weakref.ref(engine.pipe.text_encoder_2)
    engine.unload()
    gc.collect()
    assert engine.state == "unloaded" and engine.pipe is None and engine.loras is None and not engine.controlnets
    assert unet() is None and text_encoder() is None  # nothing (compel, LoRA manager, ...) kept a reference
    assert engine.status()["state"] == "unloaded" and engine.attention_backends() == {}
    engine.unload()  # twice is harmless
    assert np.array_equal(pixels(engine), reference)  # loads again on demand
    assert engine.state == "ready"
    # a module someone else still holds (a traceback, a caller) keeps no weights after an unload
    held = engine.pipe.unet
    engine.unload()
    assert sum(p.numel() for p in held.parameters()) == 0
    assert np.array_equal(pixels(engine), reference)


def test_estimate_learns_from_runs(module_home):
    engine = Engine(tiny_settings(module_home))
    steps = 4
    before = engine.estimate_seconds(SIZE, SIZE, steps)
    denoise = [engine.generate(request(steps=steps, seed=s)).timings["denoise_s"] for s in range(4)]
    after = engine.estimate_seconds(SIZE, SIZE, steps)
    assert after != before
    # estimate = learned denoise time + 1 s of fixed overhead. Each run moves the learned cost halfway to
    # what it observed, so after 4 runs the prior keeps 1/16 of the weight and the runs 15/16: the learned
    # time lies within the runs' range (robust to a slow run on a busy machine).
    prior = before - 1.0
    learned = after - 1.0
    assert 15 / 16 * min(denoise) + prior / 16 - 1e-3 <= learned <= 15 / 16 * max(denoise) + prior / 16 + 1e-3
    # and scales with the work asked for: steps and controls in proportion, pixels at most in proportion
    # (a step has a fixed cost too)
    assert after - 1.0 < engine.estimate_seconds(2 * SIZE, SIZE, steps) - 1.0 <= 2 * (after - 1.0) + 1e-9
    assert engine.estimate_seconds(SIZE, SIZE, 2 * steps) - 1.0 == pytest.approx(2 * (after - 1.0))
    assert engine.estimate_seconds(SIZE, SIZE, steps, n_controls=1) > after
    assert math.isfinite(after)


def test_estimate_separates_a_steps_fixed_cost_from_its_per_pixel_cost(module_home):
    """Measured at two sizes, a third is a line through them, not a scaling of the small one by pixels."""
    engine = Engine(tiny_settings(module_home))
    small, large = 64 * 64, 128 * 128
    engine._observed = {small: 0.05, large: 0.08}  # seconds per step: mostly fixed cost, as on the tiny engine
    per_step = (engine.estimate_seconds(256, 256, 100) - 1.0) / 100
    fixed, per_mp = 0.05 - 0.03 / (large - small) * small, 0.03 / ((large - small) / 1e6)
    assert per_step == pytest.approx(fixed + per_mp * 256 * 256 / 1e6)
    assert per_step <= 0.05 * (256 * 256) / small / 4  # a quarter of scaling 64x64 by pixels (16x)
    engine.generate(request(steps=2, seed=1))  # a real run at 64x64: learned, the other size kept
    assert engine._observed[small] != 0.05 and engine._observed[large] == 0.08
