"""ControlNet-guided generation in the engine (issue 4), on the tiny profile with real ControlNets.

The tiny ControlNets are ControlNetModel.from_unet(tiny UNet) with randomised (non-zero) output layers,
so they steer the image. Control maps here are drawn with PIL at the output size.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mcp_sdxl.config import load_settings
from mcp_sdxl.config.models import ControlNetEntry
from mcp_sdxl.engine import ControlInput, Engine, GenerationRequest, LoraSpec
from mcp_sdxl.engine import controlnet as cn
from mcp_sdxl.errors import UserInputError
from mcp_sdxl.studio.planning import Planner
from tests.conftest import CONFIGS

SIZE = 64
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and on a busy 2-core machine OpenMP's
    spinning workers made each 64x64 image ~13x slower (4.9 s instead of 0.37 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def request(**overrides) -> GenerationRequest:
    values = {"prompt": "a boy on a beach, red scarf", "width": SIZE, "height": SIZE, "steps": STEPS, "cfg_scale": 7.0}
    values["seed"] = 1
    return GenerationRequest(**{**values, **overrides})


def pixels(engine: Engine, **overrides) -> np.ndarray:
    return np.asarray(engine.generate(request(**overrides)).image, dtype=np.float32) / 255.0


def mean_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def control_map(kind: str, width: int = SIZE, height: int = SIZE) -> Image.Image:
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    if kind == "openpose":  # a stick figure
        draw.line((width // 2, height // 5, width // 2, 3 * height // 5), fill=(255, 0, 0), width=3)
        draw.line((width // 4, height // 3, 3 * width // 4, height // 3), fill=(0, 255, 0), width=3)
        draw.ellipse((width // 2 - 5, height // 5 - 10, width // 2 + 5, height // 5), fill=(0, 0, 255))
    elif kind == "depth":  # near at the bottom, far at the top
        ramp = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
        image = Image.fromarray(np.stack([ramp] * 3, -1))
    else:  # canny: white edges on black
        draw.rectangle((width // 5, height // 5, 4 * width // 5, 4 * height // 5), outline="white")
    return image


def controls(*kinds_and_strengths) -> list[ControlInput]:
    return [ControlInput(kind, control_map(kind), strength) for kind, strength in kinds_and_strengths]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_cache):
    home = tmp_path_factory.mktemp("controlnet-home")
    (home / "tiny").symlink_to(tiny_cache, target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def engine(home) -> Engine:
    return Engine(load_settings(CONFIGS, home=home, profile="tiny"))


@pytest.fixture(scope="module")
def plain(engine) -> np.ndarray:
    return pixels(engine)


@contextlib.contextmanager
def counting_calls(engine: Engine):
    """Count forward calls of each loaded ControlNet (and the batch size each call saw)."""
    calls: dict[str, list[int]] = {kind: [] for kind in engine.controlnets}
    for kind, net in engine.controlnets.items():
        original = net.forward

        def forward(sample, *args, _kind=kind, _original=original, **kwargs):
            calls[_kind].append(sample.shape[0])
            return _original(sample, *args, **kwargs)

        net.forward = forward
    try:
        yield calls
    finally:
        for net in engine.controlnets.values():
            del net.forward


def test_strength_zero_equals_plain_generation(engine, plain, monkeypatch):
    assert np.array_equal(pixels(engine, controls=controls(("openpose", 0.0))), plain)
    assert np.array_equal(pixels(engine, controls=controls(("openpose", 0.0), ("depth", 0.0))), plain)
    # also without our skip: diffusers' ControlNet pipeline prepares the same latents and time ids
    # (original/target size come from the control image, which is at the output size) and the same
    # embeddings, so a ControlNet at scale 0 adds exact zeros
    monkeypatch.setattr(cn, "skip_outside_window", lambda pipe: contextlib.nullcontext())
    assert np.array_equal(pixels(engine, controls=controls(("depth", 0.0))), plain)
    monkeypatch.undo()
    # other sizes, no CFG, another scheduler, with a text-encoder LoRA fused: still the plain image
    style = [LoraSpec("style:pixar_3d", engine.lora_file("style", "pixar_3d"), 0.7)]
    for extra in ({"width": 96, "height": 64}, {"cfg_scale": 1.0}, {"scheduler": "EulerAncestralDiscreteScheduler"},
                  {"loras": style}):
        width, height = extra.get("width", SIZE), extra.get("height", SIZE)
        zero = [ControlInput("canny", control_map("canny", width, height), 0.0)]
        assert np.array_equal(pixels(engine, controls=zero, **extra), pixels(engine, **extra)), extra


def test_strength_changes_the_image(engine, plain):
    images = {s: pixels(engine, controls=controls(("openpose", s))) for s in (0.5, 1.0, 1.5)}
    distances = [mean_change(images[s], plain) for s in (0.5, 1.0, 1.5)]
    assert 0.002 < distances[0] and distances[-1] < 0.25, distances
    assert mean_change(images[0.5], images[1.0]) > 0.002 and mean_change(images[1.0], images[1.5]) > 0.002
    assert np.array_equal(pixels(engine, controls=controls(("openpose", 1.0))), images[1.0])  # deterministic
    # the control map matters, not just the presence of a net
    other = [ControlInput("openpose", control_map("canny"), 1.0)]
    assert mean_change(pixels(engine, controls=other), images[1.0]) > 0.002


COMBINATIONS = [("openpose",), ("depth",), ("canny",), ("openpose", "depth"), ("openpose", "depth", "canny")]


def test_each_type_and_combinations_run(engine, plain):
    results = {}
    for kinds in COMBINATIONS:
        output = engine.generate(request(controls=controls(*[(k, 1.0) for k in kinds])))
        assert output.image.size == (SIZE, SIZE)
        results[kinds] = np.asarray(output.image, dtype=np.float32) / 255.0
        assert mean_change(results[kinds], plain) > 0.002, kinds
    assert sorted(engine.controlnets) == ["canny", "depth", "openpose"]
    assert mean_change(results["openpose", "depth"], results["openpose",]) > 0.002
    assert mean_change(results["openpose", "depth"], results["depth",]) > 0.002
    assert mean_change(results["openpose", "depth", "canny"], results["openpose", "depth"]) > 0.002
    depth = [ControlInput("depth", control_map("depth", 96, 64), 1.0)]
    wide = engine.generate(request(width=96, height=64, controls=depth))
    assert wide.image.size == (96, 64)


@pytest.mark.parametrize(
    ("window", "steps_in_window"),
    # diffusers keeps step i when i/N >= start and (i+1)/N <= end; N = 4 steps
    [((0.0, 1.0), 4), ((0.0, 0.5), 2), ((0.5, 1.0), 2), ((0.25, 0.75), 2)],
)
def test_controlnets_are_not_called_outside_the_window(engine, window, steps_in_window):
    three = controls(("openpose", 1.0), ("depth", 0.5), ("canny", 0.0))
    engine.generate(request(controls=three))  # load all three first
    with counting_calls(engine) as calls:
        engine.generate(request(controls=three, control_start=window[0], control_end=window[1]))
    # CFG batches the conditional and unconditional halves: one call per step, batch of 2
    assert calls["openpose"] == [2] * steps_in_window
    assert calls["depth"] == [2] * steps_in_window
    assert calls["canny"] == []  # strength 0: never run
    with counting_calls(engine) as calls:
        engine.generate(request(controls=three[:1], cfg_scale=1.0, control_start=window[0], control_end=window[1]))
    assert calls["openpose"] == [1] * steps_in_window  # no CFG: batch of 1
    assert calls["depth"] == calls["canny"] == []


def test_window_boundaries_are_validated(engine, home):
    for start, end in ((0.5, 0.5), (0.7, 0.3)):
        with pytest.raises(UserInputError, match="control_start"):
            engine.generate(request(controls=controls(("depth", 1.0)), control_start=start, control_end=end))
    planner = Planner(load_settings(CONFIGS, home=home, profile="tiny"), "tiny")
    for start, end in ((0.5, 0.5), (0.7, 0.3), (-0.1, 0.5), (0.0, 1.5), (float("nan"), 1.0)):
        with pytest.raises(UserInputError, match="control_"):
            planner.plan(kind="control", character=None, scene_description="x", control_start=start, control_end=end)


# ---------------------------------------------------------------------------------------- configuration
@pytest.fixture
def sdxl_engine(home, tiny_cache) -> Engine:
    """The real (non-tiny) code path: SDXL weights from a folder, ControlNets from controlnet_config.yaml."""
    settings = load_settings(CONFIGS, home=home, profile="sdxl")
    settings.sdxl.model = settings.sdxl.model.model_copy(update={"base_model": str(tiny_cache / "sdxl-tiny")})
    settings.controlnet.controlnets = {
        "openpose": ControlNetEntry(model=str(tiny_cache / "controlnets" / "openpose")),
        "canny": ControlNetEntry(model="acme/controlnet-canny-not-downloaded"),
        # depth: not configured at all
    }
    return Engine(settings)


def test_control_type_without_a_model_is_a_clear_error_and_loads_nothing(sdxl_engine, plain):
    engine = sdxl_engine
    assert engine.profile == "sdxl"
    with pytest.raises(UserInputError, match=r"no ControlNet for depth: no model is configured \(controlnet_config"):
        engine.generate(request(controls=controls(("openpose", 1.0), ("depth", 1.0))))
    assert engine.controlnets == {}  # openpose (listed first, loadable) was not left loaded either
    with pytest.raises(UserInputError, match="canny.*acme/controlnet-canny-not-downloaded.*not found locally"):
        engine.generate(request(controls=controls(("canny", 1.0))))
    assert engine.controlnets == {}
    assert np.array_equal(pixels(engine), plain)  # the same weights as the tiny profile: the same image
    assert mean_change(pixels(engine, controls=controls(("openpose", 1.0))), plain) > 0.002
    assert sorted(engine.controlnets) == ["openpose"]
    with pytest.raises(UserInputError, match="unknown control type 'segmentation'"):
        engine.generate(request(controls=controls(("segmentation", 1.0))))


def test_unknown_control_type_on_the_tiny_profile(engine):
    before = sorted(engine.controlnets)
    with pytest.raises(UserInputError, match="unknown control type 'segmentation'.*openpose, depth, canny"):
        engine.generate(request(controls=controls(("segmentation", 1.0))))
    assert sorted(engine.controlnets) == before


def test_controlnets_are_cached_and_released_with_the_engine(home, monkeypatch):
    engine = Engine(load_settings(CONFIGS, home=home, profile="tiny"))
    loads = []
    real_load = cn.load_controlnet
    monkeypatch.setattr(cn, "load_controlnet", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    first = pixels(engine, controls=controls(("openpose", 1.0)))
    assert len(loads) == 1 and sorted(engine.controlnets) == ["openpose"]
    assert engine.status()["controlnets_loaded"] == ["openpose"]
    net = weakref.ref(engine.controlnets["openpose"])
    assert np.array_equal(pixels(engine, controls=controls(("openpose", 1.0))), first)
    pixels(engine, controls=controls(("openpose", 0.5), ("depth", 1.0)))
    assert len(loads) == 2 and sorted(engine.controlnets) == ["depth", "openpose"]  # only depth was new
    engine.unload()
    gc.collect()
    assert engine.controlnets == {} and net() is None and engine.status()["controlnets_loaded"] == []
    assert np.array_equal(pixels(engine, controls=controls(("openpose", 1.0))), first)  # loads again on demand
    assert len(loads) == 3
