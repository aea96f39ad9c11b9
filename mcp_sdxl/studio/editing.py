"""Plans for the calls that start from an image that exists: edit_image, upscale_image, regenerate.

They read the store (the source's size, an earlier result's recorded request), so they sit beside the
planner rather than in it; each returns an ordinary Plan that the studio queues and runs like any other.
Every problem of a call is reported in one error, before the call queues or takes the GPU.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from mcp_sdxl.errors import NotFoundError, UserInputError, shown
from mcp_sdxl.store import ImageStore
from mcp_sdxl.studio.planning import ControlChoice, EditChoice, Plan, Planner, Problems

DETAIL_PROMPT = "highly detailed, sharp focus, clean lines, high resolution"


def source_image(store: ImageStore, ref: str, what: str = "image") -> tuple[str, tuple[int, int]]:
    """The reference to record for `ref` (a store id stays an id, a path becomes the resolved file) and the
    image's size; a UserInputError names what would work."""
    try:
        path = store.check_image(ref)
    except (UserInputError, NotFoundError) as exc:
        raise type(exc)(f"{what}: {exc}") from exc
    with Image.open(path) as img:
        size = img.size
    return (ref.strip().removeprefix("sdxl://images/") if store.is_id(ref) else str(path)), size


def plan_edit(store: ImageStore, planner: Planner, *, image: str, prompt: str, strength: float | None,
              mask: str | None, width: int | None, height: int | None, problems: Problems | None = None,
              **options: Any) -> Plan:
    """img2img (or, with a mask, inpainting) of `image` at `strength`."""
    problems = problems if problems is not None else Problems()
    editing = planner.settings.sdxl.editing
    source = mask_ref = None
    with problems.check():
        source = source_image(store, image)
    if mask:
        with problems.check():
            mask_ref, mask_size = source_image(store, mask, "mask")
            if source is not None and mask_size != source[1]:
                raise UserInputError(
                    f"the mask is {mask_size[0]}x{mask_size[1]} but the image is {source[1][0]}x{source[1][1]}: "
                    "give a mask of the image's size (white = repaint, black = keep)")
    notes = []
    if source is not None and width is None and height is None:
        width, height = planner.fit_size(source[1])
        if (width, height) != source[1]:
            notes.append(f"the source is {source[1][0]}x{source[1][1]}; it is edited at {width}x{height} "
                         "(the nearest size within the limits, sides a multiple of 8)")
    elif source is not None and isinstance(width or height, int) and not isinstance(width or height, bool) \
            and (width is None or height is None):  # one side given: the other keeps the source's aspect
        aspect = source[1][1] / source[1][0]
        fitted = planner.fit_size((width, round(width * aspect)) if height is None else (round(height / aspect), height))
        width, height = (width, fitted[1]) if height is None else (fitted[0], height)
    choice = EditChoice(source[0] if source else "", source[1] if source else (0, 0),
                        editing.default_strength if strength is None else strength, mask_ref)
    plan = planner.plan(kind="edit", scene_description=prompt, width=width, height=height, edit=choice,
                        problems=problems, **options)
    plan.notes[:0] = notes
    return plan


def plan_upscale(store: ImageStore, planner: Planner, *, image: str, factor: int, prompt: str | None,
                 strength: float | None, character: str | None, problems: Problems | None = None,
                 **options: Any) -> Plan:
    """`image` resized by `factor`, then repainted tile by tile at a low strength (engine.upscale)."""
    from mcp_sdxl.engine.edit import tile_grid

    problems = problems if problems is not None else Problems()
    settings = planner.settings.sdxl
    tiny = planner.profile == "tiny"
    tile = settings.tiny.upscale_tile if tiny else settings.editing.upscale_tile
    overlap = settings.tiny.upscale_overlap if tiny else settings.editing.upscale_overlap
    source = None
    with problems.check():
        source = source_image(store, image)
    notes = []
    if not (prompt or "").strip() and not (isinstance(character, str) and character.strip()):
        recorded = _recorded_prompt(store, source[0]) if source else None
        prompt = recorded or DETAIL_PROMPT
        notes.append("no prompt or character given: the tiles were repainted with "
                     + ("the source's own prompt" if recorded else f"the prompt {DETAIL_PROMPT!r}"))
    choice = EditChoice(source[0] if source else "", source[1] if source else (1, 1),
                        settings.editing.upscale_strength if strength is None else strength,
                        upscale_factor=factor, overlap=overlap)
    plan = planner.plan(kind="upscale", character=character, scene_description=prompt or "", edit=choice,
                        problems=problems, **options)
    grid = tile_grid(plan.width, plan.height, tile, overlap, 32 if tiny else 8)
    choice.tile, choice.overlap, choice.tiles = grid.tile, grid.overlap, grid.count
    plan.notes[:0] = notes
    return plan


def _recorded_prompt(store: ImageStore, ref: str) -> str | None:
    if not store.is_id(ref):
        return None
    return store.get(ref).metadata.get("prompt") or None


# ---------------------------------------------------------------------------------------------- regenerate
OVERRIDABLE = ("seed", "prompt", "negative_prompt", "quality", "steps", "cfg_scale", "width", "height",
               "character_weight", "background_weight", "style_weight", "pose_strength", "depth_strength",
               "canny_strength", "control_start", "control_end", "strength")


def plan_regenerate(store: ImageStore, planner: Planner, image_id: str, overrides: dict[str, Any]) -> Plan:
    """The plan that made `image_id`, again, with `overrides` (None: keep what was recorded)."""
    stored = store.get(image_id.strip().removeprefix("sdxl://images/") if isinstance(image_id, str) else image_id)
    meta = stored.metadata
    recorded = meta.get("request")
    if meta.get("type") != "generated" or not isinstance(recorded, dict):
        what = f"a {meta['type'].replace('_', ' ')}" if isinstance(meta.get("type"), str) else "not a generated image"
        raise UserInputError(
            f"{stored.id} is {what} without a recorded request, so it cannot be regenerated; "
            "regenerate an image a generation tool returned (its images, not its control_images)")
    given = {k: v for k, v in overrides.items() if v is not None}
    notes: list[str] = []
    kind = recorded.get("kind")
    values = {k: recorded.get(k) for k in ("character", "background", "style", "character_weight",
                                           "background_weight", "style_weight", "quality", "steps", "cfg_scale",
                                           "negative_prompt", "seed")}
    if "quality" in given:  # a new quality means its steps and guidance, unless those are given too
        values["steps"] = values["cfg_scale"] = None
    for key in ("seed", "quality", "steps", "cfg_scale", "negative_prompt", "character_weight",
                "background_weight", "style_weight"):
        if key in given:
            values[key] = given[key]
    scene = given.get("prompt", recorded.get("scene_description") or "")
    problems = Problems()
    common = dict(values, filter_consistency=True, problems=problems)
    if kind in ("edit", "upscale"):
        for key in ("width", "height") if kind == "upscale" else ():
            if key in given:
                notes.append(f"{key} had no effect: an upscale's size is the source's times its factor")
        for key in ("pose_strength", "depth_strength", "canny_strength", "control_start", "control_end"):
            if key in given:
                notes.append(f"{key} had no effect: {stored.id} was made without controls")
        strength = given.get("strength", recorded.get("strength"))
        if kind == "edit":
            width = given.get("width", recorded.get("width"))
            height = given.get("height", recorded.get("height"))
            plan = plan_edit(store, planner, image=recorded.get("source"), prompt=scene, strength=strength,
                             mask=recorded.get("mask"), width=width, height=height, **common)
        else:
            plan = plan_upscale(store, planner, image=recorded.get("source"), factor=recorded.get("upscale_factor"),
                                prompt=scene, strength=strength, **common)
    else:
        if "strength" in given:
            notes.append(f"strength had no effect: {stored.id} was not made from a source image")
        controls = _recorded_controls(store, meta, given, notes, problems)
        window = {k: given.get(k, recorded.get(k, default)) for k, default in (("control_start", 0.0),
                                                                               ("control_end", 1.0))}
        plan = planner.plan(kind=kind, scene_description=scene, width=given.get("width", recorded.get("width")),
                            height=given.get("height", recorded.get("height")), controls=controls, **window,
                            **common)
    if recorded.get("scheduler"):  # no override changes the sampler: keep the one that made the image
        plan.scheduler = recorded["scheduler"]
    plan.regenerated_from = stored.id
    plan.notes.extend(notes)
    return plan


def _recorded_controls(store: ImageStore, meta: dict, given: dict, notes: list[str],
                       problems: Problems) -> list[ControlChoice]:
    """The control maps the image was made with (stored ids: the same maps, not re-extracted)."""
    strength_arg = {"openpose": "pose_strength", "depth": "depth_strength", "canny": "canny_strength"}
    controls = []
    for used in meta.get("controls") or []:
        kind, ref = used.get("type"), used.get("control_image_id")
        with problems.check():
            if ref is None or kind not in strength_arg:
                raise UserInputError(f"{meta.get('id')}: its {kind} control map was not stored; it cannot be regenerated")
            store.check_image(ref)
        controls.append(ControlChoice(kind, ref, None, given.get(strength_arg.get(kind), used.get("strength")),
                                      preprocess=False))
    used_kinds = {c.kind for c in controls}
    for kind, arg in strength_arg.items():
        if arg in given and kind not in used_kinds:
            notes.append(f"{arg} had no effect: {meta.get('id')} was made without a {kind} control")
    if not controls:
        for key in ("control_start", "control_end"):
            if key in given:
                notes.append(f"{key} had no effect: {meta.get('id')} was made without controls")
    for choice in controls:
        with problems.check():
            if isinstance(choice.strength, bool) or not isinstance(choice.strength, (int, float)) \
                    or not 0 <= choice.strength <= 2:
                raise UserInputError(f"{strength_arg[choice.kind]} must be in [0, 2], got {shown(choice.strength)}")
    return controls
