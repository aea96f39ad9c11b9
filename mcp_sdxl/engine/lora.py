"""LoRA adapters on one SDXL pipeline, with the active set fused into the weights.

Unfused peft adapters cost ~3x per image in eager mode, so the active set (adapters + weights) is
merged into the base weights and stays merged while it does not change. Merging and unmerging in
fp16 drifts, so every change starts from a clean copy of the touched base weights (kept in CPU
RAM, pinned on CUDA hosts): generating A, then B, then A again gives A's exact image.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from mcp_sdxl.engine.loading import inference_only
from mcp_sdxl.errors import UserInputError

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class LoraSpec:
    """One adapter to apply: `key` names it uniquely (e.g. character:luca), `path` is its file."""

    key: str
    path: Path
    weight: float


def adapter_name(key: str) -> str:
    # peft module names may not contain dots; keep the name readable.
    return re.sub(r"[^0-9A-Za-z_]", "_", key)


class LoraManager:
    def __init__(self, pipe):
        self.pipe = pipe
        self.loaded: dict[str, Path] = {}  # adapter name -> file it came from
        self.active: tuple[tuple[str, float], ...] = ()  # what is fused now
        self._clean: dict[int, torch.Tensor] = {}  # id(tuner module) -> clean base weight (CPU)
        self._modules: dict[int, BaseTunerLayer] = {}
        self._disabled = False  # adapters switched off (no LoRA active): enable before fusing again

    # ------------------------------------------------------------------ public
    def changes(self, specs: list[LoraSpec]) -> bool:
        """Whether `apply(specs)` would change the model (it checks the weights first, as apply does)."""
        wanted, missing = self._plan(specs)
        return wanted != self.active or bool(missing)

    def apply(self, specs: list[LoraSpec]) -> None:
        """Make exactly `specs` active, fused. No-op when they already are."""
        wanted, missing = self._plan(specs)
        if wanted == self.active and not missing:
            return
        # Each of disable_lora / enable_lora walks every module of three models (a third of a switch's
        # time on the tiny engine): switch adapters off only when none stays active.
        self._reset_to_clean(disable=not wanted)
        try:
            for spec in missing:
                self._load(spec)
            if wanted:
                names = [n for n, _ in wanted]
                if self._disabled or missing:
                    self.pipe.enable_lora()
                    self._disabled = False
                self.pipe.set_adapters(names, adapter_weights=[w for _, w in wanted])
                self.pipe.fuse_lora(components=self._components(), adapter_names=names)
            for component in self._components():  # peft flips requires_grad per layer (see inference_only)
                inference_only(getattr(self.pipe, component))
        except BaseException:
            # clean weights, adapters off: exactly "no LoRA" (active is () already), never half-applied
            if self._modules:  # (no adapter in the model at all: nothing to switch off)
                self.pipe.disable_lora()
                self._disabled = True
            raise
        self.active = wanted

    def unload_all(self) -> None:
        """Remove every adapter and give back the clean weights."""
        self._reset_to_clean(disable=True)
        if self.loaded:
            self.pipe.unload_lora_weights()
        self._disabled = False
        self.loaded.clear()
        self._clean.clear()
        self._modules.clear()
        self.active = ()

    def move_clean_copies(self, pin: bool) -> None:
        """Pin the clean copies once a CUDA device is in use (faster host-to-device restore)."""
        if pin and torch.cuda.is_available():
            for key, tensor in self._clean.items():
                if not tensor.is_pinned():
                    self._clean[key] = tensor.pin_memory()

    # ------------------------------------------------------------------ internals
    def _plan(self, specs: list[LoraSpec]):
        for spec in specs:  # checked before anything changes: a NaN would fuse into every weight it touches
            weight = spec.weight
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
                raise UserInputError(f"LoRA weight for {spec.key} must be a number in [0, 1], got {spec.weight!r}")
        specs = [s for s in specs if s.weight != 0.0]  # weight 0 is the same as no LoRA
        wanted = tuple(sorted((adapter_name(s.key), float(s.weight)) for s in specs))
        return wanted, [s for s in specs if adapter_name(s.key) not in self.loaded]

    def _components(self) -> list[str]:
        return [c for c in COMPONENTS if getattr(self.pipe, c, None) is not None]

    def _tuner_modules(self):
        for component in self._components():
            for module in getattr(self.pipe, component).modules():
                if isinstance(module, BaseTunerLayer):
                    yield module

    def _reset_to_clean(self, disable: bool) -> None:
        if not self._modules:
            self.active = ()
            return
        with torch.no_grad():
            for key, module in self._modules.items():
                if module.merged:
                    if any(getattr(module, "lora_bias", {}).values()):
                        module.unmerge()  # a LoRA with a bias changed the base bias too: subtract it
                    else:  # the weight is overwritten from its clean copy: computing the delta is wasted
                        module.merged_adapters.clear()
                weight = module.get_base_layer().weight
                weight.copy_(self._clean[key].to(weight.device, non_blocking=True))
        if disable:
            self.pipe.disable_lora()
            self._disabled = True
        self.active = ()

    def _load(self, spec: LoraSpec) -> None:
        name = adapter_name(spec.key)
        path = Path(spec.path)
        if not path.is_file():
            raise UserInputError(f"LoRA file for {spec.key} not found: {path}. Fix lora_path in lora_registry.yaml.")
        try:
            with warnings.catch_warnings():
                # several named adapters in one model is what the manager does on purpose
                warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
                self.pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:
            self._drop_partial(name)
            raise UserInputError(
                f"LoRA file for {spec.key} could not be loaded ({path}): {type(exc).__name__}: {exc}. "
                "It must be an SDXL LoRA in diffusers/peft or Kohya/A1111 safetensors format."
            ) from exc
        self.loaded[name] = path
        with torch.no_grad():
            for module in self._tuner_modules():
                if id(module) not in self._clean:
                    self._modules[id(module)] = module
                    self._clean[id(module)] = module.get_base_layer().weight.detach().to("cpu", copy=True)

    def _drop_partial(self, name: str) -> None:
        """After a failed load, remove whatever part of the adapter got injected."""
        try:
            if name in {n for names in self.pipe.get_list_adapters().values() for n in names}:
                self.pipe.delete_adapters(name)
        except Exception:  # the pipeline may have no adapters at all yet
            log.debug("no partial adapter %s to remove", name, exc_info=True)
