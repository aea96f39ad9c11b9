"""Find and load SDXL weights and ControlNets: hub ids (local cache only), folders, single files.

Nothing here downloads: hub ids are read from the local Hugging Face cache, and single-file
checkpoints are read with the weight-less SDXL-base config folder that ships in this package.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mcp_sdxl.errors import ConfigError

log = logging.getLogger(__name__)

SDXL_BASE_CONFIG_DIR = Path(__file__).with_name("sdxl_base_config")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass(frozen=True)
class WeightSource:
    kind: str  # "single_file" | "folder" | "hub"
    location: str  # path or hub id

    def describe(self) -> str:
        return f"{self.kind}: {self.location}"


def resolve_source(value: str, models_root: Path, cache_dir: str | None = None) -> WeightSource | None:
    """Where `value` (file, folder or hub id) can be loaded from offline, or None if nowhere."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = models_root / path
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return WeightSource("single_file", str(path))
    if path.is_dir():
        return WeightSource("folder", str(path))
    if _looks_like_hub_id(value) and _in_hf_cache(value, cache_dir):
        return WeightSource("hub", value)
    return None


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))


def _in_hf_cache(repo_id: str, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model_index.json", "config.json"):
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(hit, str):
            return True
    return False


def load_sdxl_pipeline(
    source: WeightSource,
    dtype: torch.dtype,
    *,
    variant: str | None = None,
    cache_dir: str | None = None,
    single_file_config: str | Path | None = None,
    vae: WeightSource | None = None,
):
    """Load a StableDiffusionXLPipeline on the CPU (the engine moves it to the device)."""
    from diffusers import StableDiffusionXLPipeline

    kwargs = {}
    if vae is not None:
        kwargs["vae"] = _load_vae(vae, dtype, cache_dir)
    try:
        if source.kind == "single_file":  # diffusers' single-file loader still names it torch_dtype
            config = str(single_file_config or SDXL_BASE_CONFIG_DIR)
            pipe = StableDiffusionXLPipeline.from_single_file(
                source.location, config=config, local_files_only=True, torch_dtype=dtype, **kwargs
            )
        else:  # pipelines' from_pretrained takes `dtype` since 0.42 (torch_dtype warns, goes in 1.0)
            pipe = _from_pretrained(StableDiffusionXLPipeline, source, variant, cache_dir, dtype=dtype, **kwargs)
    except Exception as exc:
        raise ConfigError(f"cannot load SDXL weights from {source.describe()}: {type(exc).__name__}: {exc}") from exc
    return pipe


def _load_vae(source: WeightSource, dtype, cache_dir):
    from diffusers import AutoencoderKL

    if source.kind == "single_file":
        return AutoencoderKL.from_single_file(
            source.location, config=str(SDXL_BASE_CONFIG_DIR), subfolder="vae", local_files_only=True, torch_dtype=dtype
        )
    return _from_pretrained(AutoencoderKL, source, None, cache_dir, torch_dtype=dtype)


def load_controlnet(source: WeightSource, dtype: torch.dtype, cache_dir: str | None = None):
    from diffusers import ControlNetModel

    try:
        if source.kind == "single_file":
            config = Path(source.location).with_name("config.json")
            if config.exists():  # diffusers-format weights saved as one file beside their config
                from safetensors.torch import load_file

                model = ControlNetModel.from_config(ControlNetModel.load_config(str(config)))
                model.load_state_dict(load_file(source.location))
                return model.to(dtype)
            return ControlNetModel.from_single_file(source.location, local_files_only=True, torch_dtype=dtype)
        return _from_pretrained(ControlNetModel, source, None, cache_dir, torch_dtype=dtype)
    except Exception as exc:
        raise ConfigError(f"cannot load ControlNet from {source.describe()}: {type(exc).__name__}: {exc}") from exc


def inference_only(module: torch.nn.Module) -> torch.nn.Module:
    """No parameter requires grad, now and after every LoRA load. diffusers loads weights with
    requires_grad=True and peft turns it off for each layer it wraps: torch.compile guards on it and
    inductor's cache keys it, so the first LoRA made the compiled UNet a different graph (measured on
    an H200 under the VRAM cap: a 146.7 s compile where the cached one took 24 s)."""
    module.requires_grad_(False)
    return module


def own_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Copy CPU weights out of the memory-mapped checkpoint into fresh (64-byte aligned) tensors.

    safetensors maps the file, so a weight's address depends on its offset in the file, and CPU matmul
    kernels take other code paths (other summation orders) for unaligned data: the same weights loaded
    from a folder and from a single file gave images one 8-bit level apart. Fresh tensors make every
    source give the same image. On CUDA, moving to the device copies anyway; this is for the CPU.
    """
    with torch.no_grad():
        for param in module.parameters():
            if param.device.type == "cpu":
                param.data = param.data.clone()
    return module


def _from_pretrained(cls, source: WeightSource, variant, cache_dir, **kwargs):
    common = dict(local_files_only=True, cache_dir=cache_dir, **kwargs)
    if variant:
        try:
            return cls.from_pretrained(source.location, variant=variant, **common)
        except (OSError, ValueError):
            log.info("no %s variant for %s; loading the default weights", variant, source.location)
    return cls.from_pretrained(source.location, **common)
