"""The tools' shared argument types: flat, described, numbers that refuse true/false."""

from typing import Annotated

from pydantic import BeforeValidator, Field


def _number_not_bool(value):
    """pydantic takes true/false for 1/0 in a number field: `steps: true` would run 1 step."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


NotBool = BeforeValidator(_number_not_bool)
Character = Annotated[str, Field(description="character name from list_characters, e.g. 'luca'")]
OptCharacter = Annotated[str | None, Field(description="character name from list_characters; adds its LoRA, trigger words and preset prompt")]
Scene = Annotated[str, Field(description="what the character does and where, e.g. 'running on the beach, excited'. compel weighting works: (word)1.3, word++")]
Background = Annotated[str | None, Field(description="background LoRA name from list_characters, e.g. 'portorosso'")]
Style = Annotated[str | None, Field(description="style LoRA name; default: the character's default style; 'none' for no style LoRA")]
Quality = Annotated[str | None, Field(description="quality preset: draft (fast), standard, high; default standard")]
Seed = Annotated[int | None, NotBool, Field(description="seed for reproducible images (0-4294967295); candidates use seed, seed+1, ...; omitted or -1: random")]
Size = Annotated[int | None, NotBool, Field(description="pixels, multiple of 8; default from the preset (1024 for SDXL)")]
Steps = Annotated[int | None, NotBool, Field(description="denoising steps; overrides the quality preset")]
Cfg = Annotated[float | None, NotBool, Field(description="classifier-free guidance scale 0-30; overrides the quality preset")]
Negative = Annotated[str | None, Field(description="extra negative prompt, added to the character's")]
Weight = Annotated[float | None, NotBool, Field(description="LoRA weight 0.0-1.0; default from the preset/registry; 0 disables")]
Candidates = Annotated[int, NotBool, Field(description="how many images to generate (seed, seed+1, ...); 1-8")]
Filter = Annotated[bool, Field(description="score candidates against the character's reference faces and order best first")]
AsJob = Annotated[bool, Field(description="return a job_id at once instead of waiting (poll get_job)")]
ImageRef = Annotated[str | None, Field(description="image id (img_...) or a file path under the input folders")]
Strength = Annotated[float | None, NotBool, Field(description="ControlNet strength 0.0-2.0; default from controlnet_config.yaml")]
