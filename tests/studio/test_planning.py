"""The Planner: flat tool arguments -> a validated Plan (no torch, no engine; issues 3 and 4).

Trigger-word rule (what `compose_prompt` does, pinned down here):
- a trigger word counts as PRESENT when it appears as whole words, case-insensitively, inside one
  comma-separated phrase of the preset prompt or the scene, after compel weighting syntax is stripped:
  "(luca)1.3", "luca++", "luca--", "(brown hair:1.2)" all contain it; "lucas" does not;
- absent trigger words of every LoRA with weight > 0 are PREPENDED once each, in LoRA order (character,
  background, style) and registry order within a LoRA; a word two LoRAs share is added once;
- the user's own text is never rewritten: a word the scene itself repeats stays as written.
"""

from __future__ import annotations

import math
import re

import pytest

from mcp_sdxl.config import load_settings
from mcp_sdxl.errors import NotFoundError, UserInputError
from mcp_sdxl.studio.planning import Planner
from tests.conftest import CONFIGS


@pytest.fixture
def settings(tmp_path):
    return load_settings(CONFIGS, home=tmp_path, profile="tiny")


@pytest.fixture
def planner(settings) -> Planner:
    return Planner(settings, "tiny")


def plan(planner: Planner, character="luca", scene="on the pier", **kwargs):
    kind = "character" if character else "control"
    return planner.plan(kind=kind, character=character, scene_description=scene, seed=7, **kwargs)


def loras(p) -> list[tuple[str, str, float]]:
    return [(lo.kind, lo.name, lo.weight) for lo in p.loras]


def count(prompt: str, word: str) -> int:
    return len(re.findall(r"(?<!\w)" + re.escape(word.lower()) + r"(?!\w)", prompt.lower()))


# ---------------------------------------------------------------------------------------- names
def test_unknown_names_are_not_found_errors_listing_the_valid_ones(planner):
    with pytest.raises(NotFoundError, match=r"unknown character 'lucia'.*alberto, luca"):
        plan(planner, character="lucia")
    with pytest.raises(NotFoundError, match=r"unknown background 'venice'.*portorosso"):
        plan(planner, background="venice")
    with pytest.raises(NotFoundError, match=r"unknown style 'anime'.*pixar_3d"):
        plan(planner, style="anime")
    with pytest.raises(NotFoundError, match=r"unknown style 'anime'.*pixar_3d"):  # also without a character
        plan(planner, character=None, scene="a boat", style="anime")
    assert issubclass(NotFoundError, UserInputError)
    # a near miss names the likely one first (what a model would retry with)
    with pytest.raises(NotFoundError, match=r"unknown character 'Luca'; did you mean 'luca'\? valid"):
        plan(planner, character="Luca")
    with pytest.raises(NotFoundError, match=r"did you mean 'portorosso'"):
        plan(planner, background="porto rosso")


def test_one_error_names_every_problem_of_the_call(planner):
    """A model fixes the call in one round, not one round per field."""
    with pytest.raises(UserInputError) as err:
        plan(planner, style="pixr", steps=500, width=100, num_candidates=20, cfg_scale=-3, control_start=0.9,
             control_end=0.1)
    message = str(err.value)
    assert message.startswith("6 problems: ")
    for part in ("unknown style 'pixr'; did you mean 'pixar_3d'?", "steps must be in [1, 100], got 500",
                 "cfg_scale must be in [0, 30], got -3", "width must be a multiple of 32",
                 "num_candidates must be in [1, 8], got 20", "control_start (0.9) must be below control_end (0.1)"):
        assert part in message, (part, message)
    with pytest.raises(NotFoundError, match=r"^2 problems: unknown character 'lucca'.*; unknown background"):
        plan(planner, character="lucca", background="venice")


def test_seed_minus_one_is_random_and_bounds_read_as_integers(planner):
    seeds = {planner.plan(kind="character", character="luca", scene_description="x", seed=-1).seeds[0]
             for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)
    with pytest.raises(UserInputError, match=r"seed must be in \[0, 4294967294\], got -5$"):
        planner.plan(kind="character", character="luca", scene_description="x", seed=-5)


# ---------------------------------------------------------------------------------------- weights
def test_preset_defaults_apply_when_weights_are_not_given(planner, settings):
    # luca: preset lora_weight 0.85 (beats the registry's 0.8), default style pixar_3d at its registry 0.7
    assert loras(plan(planner)) == [("character", "luca", 0.85), ("style", "pixar_3d", 0.7)]
    assert loras(plan(planner, background="portorosso")) == [
        ("character", "luca", 0.85), ("background", "portorosso", 0.6), ("style", "pixar_3d", 0.7)
    ]
    given = plan(planner, background="portorosso", character_weight=0.3, background_weight=1, style_weight=0)
    assert loras(given) == [("character", "luca", 0.3), ("background", "portorosso", 1.0), ("style", "pixar_3d", 0.0)]
    # a preset without its own weight takes the registry default; an explicit 0.0 in the preset means off
    settings.presets["luca"].lora_weight = None
    assert loras(plan(planner))[0] == ("character", "luca", 0.8)
    settings.presets["luca"].lora_weight = 0.0
    assert loras(plan(planner))[0] == ("character", "luca", 0.0)
    # no character: only what is asked for, at registry defaults
    assert loras(plan(planner, character=None, scene="a boat", style="pixar_3d")) == [("style", "pixar_3d", 0.7)]


def test_style_none_disables_the_default_style(planner, settings):
    settings.presets["luca"].base_prompt = "a child"  # so the style's trigger words are not in the preset
    off = plan(planner, style="none")
    assert loras(off) == [("character", "luca", 0.85)]
    assert count(off.prompt, "pixar style") == 0 and count(off.prompt, "3d animation") == 0
    on = plan(planner)
    assert count(on.prompt, "pixar style") == 1
    assert loras(plan(planner, style="none", background="portorosso"))[-1] == ("background", "portorosso", 0.6)


@pytest.mark.parametrize("name", ["character_weight", "background_weight", "style_weight"])
@pytest.mark.parametrize("value", [1.5, -0.1, math.nan, math.inf, "0.5", True])
def test_weights_outside_unit_interval_or_not_numbers_are_refused(planner, name, value):
    with pytest.raises(UserInputError, match=name):
        plan(planner, background="portorosso", **{name: value})


def test_weights_are_checked_even_for_loras_not_in_use(planner):
    with pytest.raises(UserInputError, match="background_weight"):
        plan(planner, background_weight=2.0)  # no background chosen: still a bad value, said so
    with pytest.raises(UserInputError, match="character_weight"):
        plan(planner, character=None, scene="a boat", character_weight=-1)


# ---------------------------------------------------------------------------------------- trigger words
LUCA = ["luca", "boy", "brown hair", "green eyes"]
PIXAR = ["pixar style", "3d animation", "smooth shading"]
PORTOROSSO = ["portorosso", "italian seaside town", "colorful buildings"]


def test_trigger_words_already_in_the_preset_are_not_added_again(planner, settings):
    p = plan(planner)
    assert p.prompt == f"{settings.presets['luca'].base_prompt}, on the pier"  # nothing prepended
    assert all(count(p.prompt, w) == 1 for w in LUCA + PIXAR)


def test_trigger_words_are_added_once_and_scene_repeats_are_not_duplicated(planner):
    p = plan(planner, scene="walking through Portorosso at dusk, portorosso harbour", background="portorosso")
    assert count(p.prompt, "portorosso") == 2  # the scene's own two mentions, nothing added
    assert count(p.prompt, "italian seaside town") == 1 and count(p.prompt, "colorful buildings") == 1
    assert p.prompt.startswith("italian seaside town, colorful buildings, luca, boy")
    assert all(count(p.prompt, w) == 1 for w in LUCA + PIXAR)


def test_weighted_trigger_words_count_as_present(planner, settings):
    settings.presets["luca"].base_prompt = ""
    p = plan(planner, scene="(luca)1.3 running on the pier, brown hair++, (Green Eyes:1.2)")
    added = "boy, pixar style, 3d animation, smooth shading"
    assert p.prompt == f"{added}, (luca)1.3 running on the pier, brown hair++, (Green Eyes:1.2)"
    assert all(count(p.prompt, w) == 1 for w in LUCA + PIXAR)
    # whole words only: "lucas" is not "luca"
    lucas = plan(planner, scene="lucas on the pier", style="none")
    assert lucas.prompt == "luca, boy, brown hair, green eyes, lucas on the pier"


def test_no_trigger_words_for_a_lora_at_weight_zero(planner, settings):
    settings.presets["luca"].base_prompt = ""
    p = plan(planner, character_weight=0, style_weight=0)
    assert p.prompt == "on the pier"
    assert loras(p) == [("character", "luca", 0.0), ("style", "pixar_3d", 0.0)]


def test_negative_prompts_merge_without_duplicates(planner):
    p = plan(planner, negative_prompt="blurry, extra fingers, Low Quality")
    assert p.negative_prompt == "2d, flat, anime, low quality, blurry, distorted, extra fingers"


# ---------------------------------------------------------------------------------------- controls
def test_control_inputs_are_validated(planner):
    def controls(**kwargs):
        names = ("pose_image", "pose_preset", "pose_strength", "depth_image", "depth_strength", "canny_image",
                 "canny_strength")
        args = {**dict.fromkeys(names), "preprocess": True}
        return planner.controls(**{**args, **kwargs})

    chosen = controls(pose_preset="waving", depth_image="d.png", depth_strength=2.0, preprocess=False)
    assert [(c.kind, c.pose_preset, c.image_ref, c.strength) for c in chosen] == [
        ("openpose", "waving", None, 1.0), ("depth", None, "d.png", 2.0)
    ]
    assert controls(canny_image="c.png")[0].strength == 0.7  # controlnet_config.yaml default
    # a photo to estimate depth from needs a depth model: said before the call queues or takes the GPU
    with pytest.raises(UserInputError, match=r"No depth estimation model is available \(preprocessing.depth.model is not set\)"):
        controls(depth_image="d.png")
    for bad in ({"depth_image": "d.png", "depth_strength": 2.5, "preprocess": False}, {"canny_image": "c.png", "canny_strength": -0.1},
                {"pose_image": "p.png", "pose_strength": math.nan}):
        with pytest.raises(UserInputError, match="strength must be"):
            controls(**bad)
    with pytest.raises(UserInputError, match="not both"):
        controls(pose_image="p.png", pose_preset="waving")
    with pytest.raises(UserInputError, match="depth_strength given without depth_image"):
        controls(depth_strength=1.0)
    with pytest.raises(UserInputError, match="at least one control"):
        controls()


def test_prompts_that_would_stall_the_weighting_parser_are_refused_before_they_queue(planner):
    """compel's parse time grows about 4x per nesting level and per unmatched parenthesis (12 unclosed ran
    for hours in the engine's worker, GPU taken, every later call queued behind it)."""
    with pytest.raises(UserInputError, match=r"the prompt nests parentheses/brackets 6 deep; use at most 4"):
        plan(planner, scene="((((((beach))))))")
    with pytest.raises(UserInputError, match=r"negative_prompt nests parentheses/brackets 12 deep"):
        plan(planner, negative_prompt="(" * 12 + " blurry")
    with pytest.raises(UserInputError, match=r"negative_prompt has 3 unmatched parentheses/brackets; close them"):
        plan(planner, negative_prompt="(blurry (dark [grainy")
    with pytest.raises(UserInputError, match=r"3 unmatched"):
        plan(planner, scene="beach)))")
    # what prompts use stays allowed: weights, a little nesting, an emoticon, escaped parentheses
    for scene in ("(red scarf)1.3 [sad] hat++", "((waving))", "smiling :) on the pier", r"a sign reading \(((open\)"):
        assert plan(planner, scene=scene).prompt


def test_integers_too_big_for_a_float_are_range_errors(planner):
    """math.isfinite(10**400) raised OverflowError: the model got a Python error, not the range."""
    huge = 10**400
    with pytest.raises(UserInputError) as err:
        planner.plan(kind="character", character="luca", scene_description="x", seed=huge, steps=huge, width=huge)
    message = str(err.value)
    assert "OverflowError" not in message and "seed must be in [0, 4294967294], got 100000000000... (401 digits)" in message
    assert "steps must be in [1, 100]" in message
