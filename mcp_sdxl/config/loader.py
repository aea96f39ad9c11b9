"""Read one YAML file into one pydantic model, with errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from mcp_sdxl.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def load_yaml_model(path: Path, model: type[ModelT], *, missing_ok: bool = False) -> ModelT:
    """Parse `path` as YAML and validate it as `model`.

    A missing file gives the model's defaults when `missing_ok`; any problem raises ConfigError
    with one line per bad key: "configs/x.yaml: key.sub: what is wrong".
    """
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return model()
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from exc


def format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{path}: {key}: {err['msg']}")
    return "\n".join(lines)
