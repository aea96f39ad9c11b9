"""Turn flat tool arguments into a validated generation plan (no torch, no GPU: fast to reject).

This is the seed's CharacterGenerator front half: preset + scene + LoRA stack + trigger words +
quality preset + size + seeds + controls. Problems raise UserInputError/NotFoundError with a
message that names what would work; plan() reports every problem of a call in one error.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import random
from dataclasses import dataclass, field

from mcp_sdxl.config import Settings
from mcp_sdxl.config.models import CharacterPreset, LoraEntry
from mcp_sdxl.errors import NotFoundError, UserInputError, shown
from mcp_sdxl.studio.prompting import compose_prompt, merge_negative, weighting_problem

CONTROL_KINDS = {"pose": "openpose", "depth": "depth", "canny": "canny"}


@dataclass
class LoraChoice:
    kind: str  # character | background | style
    name: str
    weight: float
    entry: LoraEntry


@dataclass
class ControlChoice:
    kind: str  # openpose | depth | canny
    image_ref: str | None  # input path or store id
    pose_preset: str | None
    strength: float
    preprocess: bool


@dataclass
class EditChoice:
    """The image a call starts from (edit_image, upscale_image), checked and measured at planning."""

    source_ref: str  # a store id, or the resolved path of an input file
    source_size: tuple[int, int]
    strength: float  # 0: the source unchanged; 1: repainted whole
    mask_ref: str | None = None  # inpainting: white is repainted, black kept
    upscale_factor: int = 1
    tile: tuple[int, int] | None = None  # upscaling: the img2img tile's size
    overlap: int = 0
    tiles: int = 1


@dataclass
class Plan:
    kind: str  # character | control | edit | upscale
    character: str | None
    prompt: str
    negative_prompt: str
    loras: list[LoraChoice]
    quality: str
    steps: int
    cfg_scale: float
    scheduler: str
    width: int
    height: int
    seeds: list[int]
    filter_consistency: bool
    threshold: float | None
    controls: list[ControlChoice] = field(default_factory=list)
    control_start: float = 0.0
    control_end: float = 1.0
    notes: list[str] = field(default_factory=list)  # parts of the request that had no effect, said plainly
    scene: str = ""  # the caller's own words; prompt = preset prompt + scene + trigger words
    extra_negative: str | None = None  # the caller's negative prompt, before the preset's is merged in
    background: str | None = None
    style: str | None = None  # "none": no style LoRA (not even the character's default)
    edit: EditChoice | None = None
    denoise_steps: int = 0  # steps each image (each tile) runs: `steps` scaled by the edit's strength
    regenerated_from: str | None = None

    @property
    def total_steps(self) -> int:
        return self.denoise_steps * len(self.seeds) * (self.edit.tiles if self.edit else 1)

    def request_record(self, seed: int) -> dict:
        """What regenerate needs to make this plan's image of `seed` again (kept in its metadata)."""
        weights = {f"{lo.kind}_weight": lo.weight for lo in self.loras}
        record = {
            "kind": self.kind, "character": self.character, "scene_description": self.scene,
            "negative_prompt": self.extra_negative, "background": self.background, "style": self.style,
            "character_weight": weights.get("character_weight"),
            "background_weight": weights.get("background_weight"), "style_weight": weights.get("style_weight"),
            "quality": self.quality, "steps": self.steps, "cfg_scale": self.cfg_scale, "scheduler": self.scheduler,
            "width": self.width, "height": self.height, "seed": seed,
            "control_start": self.control_start, "control_end": self.control_end,
        }
        if self.edit is not None:
            record.update(source=self.edit.source_ref, mask=self.edit.mask_ref, strength=self.edit.strength,
                          upscale_factor=self.edit.upscale_factor)
        return record


def _finite(name: str, value, low: float, high: float) -> float:
    # math.isfinite(10**400) overflows: an int is always finite
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                          and not math.isfinite(value)):
        raise UserInputError(f"{name} must be a number in [{_num(low)}, {_num(high)}], got {shown(value)}")
    if not low <= value <= high:
        raise UserInputError(f"{name} must be in [{_num(low)}, {_num(high)}], got {_num(value)}")
    return float(value)


def model_ref(value: str | None, model_path) -> str | None:
    """A local path (relative to the models root) when it exists, else the value as a hub id."""
    if not value:
        return None
    path = model_path(value)
    return str(path) if path.exists() else value


def _num(value: float) -> str:
    """4294967295, not 4.29497e+09: the model copies the bound it is shown."""
    if isinstance(value, int):
        digits = str(value)
        return digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits.lstrip('-'))} digits)"
    return str(int(value)) if value.is_integer() else f"{value:g}"


def _unknown(kind: str, name, valid: list[str]) -> NotFoundError:
    hint = ""
    if isinstance(name, str) and len(name) <= 200:
        close = [v for v in valid if v.lower() == name.strip().lower()] or difflib.get_close_matches(name, valid, n=2)
        if close:
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? "
    listed = ", ".join(valid) or "none configured"
    return NotFoundError(f"unknown {kind} {shown(name)}; {hint}valid {kind}s: {listed} (see list_characters)")


def _pick(names: dict, kind: str, name: str):
    if name not in names:
        raise _unknown(kind, name, sorted(names))
    return names[name]


class Problems:
    """The problems of one request, collected so one error names them all (a model fixes the call in one
    round instead of one round per field)."""

    def __init__(self):
        self.errors: list[Exception] = []

    @contextlib.contextmanager
    def check(self):
        try:
            yield
        except (UserInputError, NotFoundError) as exc:
            self.errors.append(exc)

    def raise_any(self) -> None:
        if not self.errors:
            return
        if len(self.errors) == 1:
            raise self.errors[0]
        kind = NotFoundError if all(isinstance(e, NotFoundError) for e in self.errors) else UserInputError
        raise kind(f"{len(self.errors)} problems: " + "; ".join(str(e) for e in self.errors))


class Planner:
    def __init__(self, settings: Settings, profile: str):
        self.settings = settings
        self.profile = profile

    # ------------------------------------------------------------------ characters
    def character_names(self) -> list[str]:
        return sorted(set(self.settings.presets) | set(self.settings.loras.characters))

    def preset(self, character: str) -> CharacterPreset:
        if not isinstance(character, str) or character not in self.character_names():
            raise _unknown("character", character, self.character_names())
        preset = self.settings.presets.get(character)
        if preset is None:  # a registry LoRA without a preset: sensible defaults
            entry = self.settings.loras.characters[character]
            preset = CharacterPreset(character_name=entry.name, lora_name=character)
        return preset

    # ------------------------------------------------------------------ plan
    def plan(
        self,
        *,
        kind: str,
        character: str | None,
        scene_description: str,
        background: str | None = None,
        style: str | None = None,
        quality: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        negative_prompt: str | None = None,
        character_weight: float | None = None,
        background_weight: float | None = None,
        style_weight: float | None = None,
        num_candidates: int = 1,
        filter_consistency: bool = True,
        threshold: float | None = None,
        controls: list[ControlChoice] | None = None,
        control_start: float = 0.0,
        control_end: float = 1.0,
        edit: EditChoice | None = None,
        problems: Problems | None = None,
    ) -> Plan:
        gen = self.settings.sdxl.generation
        limits = gen.limits
        # every independent problem is checked: one error names them all (with those found before, if given)
        problems = problems if problems is not None else Problems()
        if isinstance(character, str) and not character.strip():
            character = None  # "" is what models send for "no character" (as for background and style)
        preset = None
        with problems.check():
            if kind == "character" and character is None:
                raise UserInputError(f"give a character: one of {', '.join(self.character_names())} "
                                     "(generate_with_control draws without one)")
            preset = self.preset(character) if character is not None else None
        with problems.check():
            if not isinstance(scene_description, str):
                raise UserInputError("scene_description/prompt must be a string")
            if len(scene_description) > 4000 or len(negative_prompt or "") > 4000:
                raise UserInputError("prompts are limited to 4000 characters; shorten the description")
            for field, text in (("the prompt", scene_description), ("negative_prompt", negative_prompt or "")):
                problem = weighting_problem(text, field)
                if problem:
                    raise UserInputError(problem)
            if character is None and not scene_description.strip():
                raise UserInputError("give a prompt (or a character) describing the image")

        notes: list[str] = []
        loras = self._loras(preset, background, style, character_weight, background_weight, style_weight, notes,
                            problems)

        quality = quality or gen.default_quality
        with problems.check():
            if quality not in gen.quality_presets:
                raise UserInputError(f"unknown quality {shown(quality)}; use one of {', '.join(gen.quality_presets)}")
        q = gen.quality_presets.get(quality) or gen.quality_presets[gen.default_quality]
        params = preset.generation_params if preset else None
        # A preset's own steps/cfg refine the default ('standard') quality; draft/high stay what they say.
        # (cfg used to come from the preset for every quality, so luca's 'high' ran at 7.5 instead of 8.0.)
        refine = params if params is not None and quality == gen.default_quality else None
        base_steps = refine.steps if refine is not None and refine.steps is not None else q.steps
        if steps is None and self.profile == "tiny":
            base_steps = max(2, round(base_steps * self.settings.sdxl.tiny.steps_scale))
        with problems.check():
            if steps is not None:
                base_steps = int(_finite("steps", steps, 1, limits.max_steps))
        if cfg_scale is None:
            cfg_scale = refine.cfg_scale if refine is not None and refine.cfg_scale is not None else q.cfg_scale
        cfg = q.cfg_scale
        with problems.check():
            cfg = _finite("cfg_scale", cfg_scale, 0.0, 30.0)
        scheduler = (params.scheduler if params and params.scheduler else None) or gen.scheduler

        size = (0, 0)
        with problems.check():
            size = self._upscale_size(edit) if kind == "upscale" else self._size(preset, width, height)
        width, height = size
        denoise = base_steps
        if edit is not None:
            with problems.check():
                edit.strength = _finite("strength", edit.strength, 0.0, 1.0)
                denoise = min(int(base_steps * edit.strength), base_steps)
                if edit.strength > 0 and denoise < 1:
                    raise UserInputError(
                        f"strength {edit.strength:g} with {base_steps} steps runs no denoising step (img2img runs "
                        f"steps x strength); use strength >= {1 / base_steps:.3f}, more steps, or 0 to keep the source")
        count = 1
        with problems.check():
            count = int(_finite("num_candidates", num_candidates, 1, limits.max_candidates))
        if seed is None or (seed == -1 and not isinstance(seed, bool)):  # -1: random, as in most SD front ends
            seed = random.randint(0, 2**31 - 1)
        with problems.check():
            seed = int(_finite("seed", seed, 0, 2**32 - 1 - count))
        with problems.check():
            if threshold is not None:
                threshold = _finite("threshold", threshold, 0.0, 1.0)
        window = []
        for name, value in (("control_start", control_start), ("control_end", control_end)):
            with problems.check():
                window.append(_finite(name, value, 0.0, 1.0))
        with problems.check():
            if len(window) == 2 and window[0] >= window[1]:
                raise UserInputError(f"control_start ({window[0]:g}) must be below control_end ({window[1]:g})")
        problems.raise_any()

        control_start, control_end = window
        return Plan(
            kind=kind, character=character, prompt=compose_prompt(
                [preset.base_prompt if preset else "", scene_description],
                [w for lo in loras if lo.weight > 0 for w in lo.entry.trigger_words]),
            negative_prompt=merge_negative(preset.negative_prompt if preset else "", negative_prompt), loras=loras,
            quality=quality, steps=base_steps, cfg_scale=cfg, scheduler=scheduler, width=width, height=height,
            seeds=[seed + i for i in range(count)], filter_consistency=bool(filter_consistency),
            threshold=threshold, controls=controls or [], control_start=control_start, control_end=control_end,
            notes=notes, scene=scene_description, extra_negative=negative_prompt or None,
            background=next((lo.name for lo in loras if lo.kind == "background"), None),
            style=next((lo.name for lo in loras if lo.kind == "style"), "none"), edit=edit, denoise_steps=denoise,
        )

    def _loras(self, preset, background, style, character_weight, background_weight, style_weight, notes,
               problems: Problems):
        registry = self.settings.loras
        chosen: list[LoraChoice] = []
        with problems.check():
            if preset is not None and preset.lora_name:
                entry = registry.characters[preset.lora_name]
                if character_weight is not None:
                    weight = character_weight
                else:  # `is not None`: a preset weight of 0.0 means "off", not "registry default"
                    weight = preset.lora_weight if preset.lora_weight is not None else entry.default_weight
                chosen.append(LoraChoice("character", preset.lora_name, _finite("character_weight", weight, 0, 1),
                                         entry))
            elif character_weight is not None:
                _finite("character_weight", character_weight, 0, 1)
        with problems.check():
            if background:
                entry = _pick(registry.backgrounds, "background", background)
                weight = background_weight if background_weight is not None else entry.default_weight
                chosen.append(LoraChoice("background", background, _finite("background_weight", weight, 0, 1),
                                         entry))
            elif background_weight is not None:
                _finite("background_weight", background_weight, 0, 1)
        if style is None and preset is not None:
            style = preset.default_style
        with problems.check():
            if style and style != "none":
                entry = _pick(registry.styles, "style", style)
                weight = style_weight if style_weight is not None else entry.default_weight
                chosen.append(LoraChoice("style", style, _finite("style_weight", weight, 0, 1), entry))
            elif style_weight is not None:
                _finite("style_weight", style_weight, 0, 1)
        used = {c.kind for c in chosen}
        for kind, value in (("character", character_weight), ("background", background_weight),
                            ("style", style_weight)):
            if isinstance(value, (int, float)) and kind not in used:
                notes.append(f"{kind}_weight {value:g} had no effect: no {kind} LoRA is used in this call "
                             f"(give {kind}=<name>; see list_characters)")
        return chosen

    def _size(self, preset, width, height) -> tuple[int, int]:
        gen = self.settings.sdxl.generation
        limits = gen.limits
        multiple = 8
        if self.profile == "tiny":
            default = self.settings.sdxl.tiny.default_size
            low, multiple = 64, 32  # the tiny UNet downsamples 32x
        else:
            size = preset.generation_params.size if preset else None
            default = size or gen.default_size
            low = limits.min_size
        width = default[0] if width is None else width
        height = default[1] if height is None else height
        for name, value in (("width", width), ("height", height)):
            _finite(name, value, low, limits.max_size)
            if int(value) != value or int(value) % multiple:
                raise UserInputError(f"{name} must be a multiple of {multiple} in [{low}, {limits.max_size}], got {value}")
        if width * height > limits.max_pixels:
            raise UserInputError(f"{width}x{height} exceeds the pixel limit {limits.max_pixels}; use a smaller size")
        return int(width), int(height)

    def _upscale_size(self, edit: EditChoice) -> tuple[int, int]:
        editing = self.settings.sdxl.editing
        factor = edit.upscale_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not 2 <= factor <= editing.max_upscale_factor:
            raise UserInputError(f"factor must be a whole number from 2 to {editing.max_upscale_factor}, got {shown(factor)}")
        width, height = (side * factor for side in edit.source_size)
        if width * height > editing.max_upscale_pixels:
            largest = math.isqrt(editing.max_upscale_pixels // (edit.source_size[0] * edit.source_size[1]))
            hint = f"use factor {largest}" if largest >= 2 else "upscale a smaller image"
            raise UserInputError(f"{edit.source_size[0]}x{edit.source_size[1]} x{factor} is {width}x{height}, over the "
                                 f"limit of {editing.max_upscale_pixels} pixels (editing.max_upscale_pixels); {hint}")
        return width, height

    def fit_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size nearest `size` (same aspect) that a generation call takes: within the limits, sides a
        multiple of 8 (the tiny engine's 32)."""
        limits = self.settings.sdxl.generation.limits
        low, multiple = (64, 32) if self.profile == "tiny" else (limits.min_size, 8)
        width, height = size
        scale = min(1.0, math.sqrt(limits.max_pixels / (width * height)), limits.max_size / max(width, height))
        scale = max(scale, low / min(width, height))

        def side(value: float) -> int:
            return int(min(limits.max_size, max(low, round(value / multiple) * multiple)))

        fitted = side(width * scale), side(height * scale)
        while fitted[0] * fitted[1] > limits.max_pixels:  # rounding up may cross the pixel limit
            fitted = side(fitted[0] - multiple), side(fitted[1] - multiple)
        return fitted

    # ------------------------------------------------------------------ controls
    def controls(
        self,
        *,
        pose_image: str | None,
        pose_preset: str | None,
        pose_strength: float | None,
        depth_image: str | None,
        depth_strength: float | None,
        canny_image: str | None,
        canny_strength: float | None,
        preprocess: bool,
        problems: Problems | None = None,
    ) -> list[ControlChoice]:
        """The controls asked for. With `problems`, what is wrong is collected there (and [] or the
        controls that are right are returned) so plan() reports it with everything else."""
        collect = problems if problems is not None else Problems()
        configured = self.settings.controlnet.controlnets
        inputs = {
            "openpose": (pose_image, pose_strength, "pose_image or pose_preset", "pose_strength"),
            "depth": (depth_image, depth_strength, "depth_image", "depth_strength"),
            "canny": (canny_image, canny_strength, "canny_image", "canny_strength"),
        }
        before = len(collect.errors)
        with collect.check():
            if pose_image and pose_preset:
                raise UserInputError("give pose_image or pose_preset, not both")
        chosen = []
        for kind, (ref, strength, image_arg, strength_arg) in inputs.items():
            preset = pose_preset if kind == "openpose" else None
            with collect.check():
                if not ref and not preset:
                    if strength is not None:
                        raise UserInputError(f"{strength_arg} given without {image_arg}: add {image_arg.split(' or ')[0]} "
                                             f"(a path under the input folders or an image id) or drop {strength_arg}")
                    continue
                if self.profile != "tiny" and kind not in configured:
                    raise UserInputError(f"no ControlNet is configured for {kind} in controlnet_config.yaml; "
                                         f"configured: {', '.join(configured) or 'none'}")
                if kind == "depth" and preprocess:  # found missing only after queueing and taking the GPU
                    from mcp_sdxl.engine.preprocess.depth import require_depth_model  # torch-free module

                    require_depth_model(model_ref(self.settings.controlnet.preprocessing.depth.model,
                                                  self.settings.model_path))
                default = configured[kind].default_strength if kind in configured else 1.0
                value = _finite(strength_arg, default if strength is None else strength, 0, 2)
                chosen.append(ControlChoice(kind, ref or None, preset, value, bool(preprocess)))
        if not chosen and len(collect.errors) == before:
            with collect.check():
                raise UserInputError(
                    "give at least one control: pose_image or pose_preset, depth_image, or canny_image "
                    "(paths under the input folders or image ids)"
                )
        if problems is None:
            collect.raise_any()
        return chosen
