"""Pydantic models for the user-editable YAML files in configs/.

One model per file: SDXLConfig (sdxl_config.yaml), LoraRegistry (lora_registry.yaml),
CharacterPresets (character_presets.yaml), ControlNetConfig (controlnet_config.yaml).
Unknown keys are errors, so a typo in a config file is reported instead of silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- sdxl_config.yaml
class ModelSource(Strict):
    # A hub id (read from the local Hugging Face cache), a local diffusers folder, or a single
    # .safetensors checkpoint. Relative paths are relative to the models root.
    base_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    cache_dir: str | None = None
    variant: str | None = "fp16"
    # Optional separate VAE (e.g. the fp16-fix VAE): hub id, folder or file.
    vae: str | None = None
    # Config folder for single-file checkpoints (default: the SDXL-base configs shipped in the package).
    single_file_config: str | None = None


class Hardware(Strict):
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # used on CUDA; CPU always runs float32
    vram_optimization: bool = True
    enable_cpu_offload: bool = False
    enable_sequential_cpu_offload: bool = False
    # Cap on this process's GPU memory (torch allocator), e.g. 15.5 for a 16 GB card shared with nothing
    # else. Under a cap (and on any card under 24 GiB) CUDA graphs are kept for one kind of call at a time
    # (their memory pool is freed when the call's size or ControlNets change). None: no cap.
    vram_limit_gb: float | None = Field(None, gt=0, le=1024)


class Attention(Strict):
    backend: Literal["sdpa"] = "sdpa"
    enable_xformers: bool = False

    @field_validator("enable_xformers")
    @classmethod
    def _no_xformers(cls, value: bool) -> bool:
        if value:
            raise ValueError("xformers is not supported: PyTorch SDPA is the only attention backend")
        return value


class QualityPreset(Strict):
    steps: int = Field(ge=1, le=200)
    cfg_scale: float = Field(ge=0.0, le=30.0)


class Limits(Strict):
    min_size: int = Field(256, ge=64)
    max_size: int = Field(2048, ge=64)
    max_pixels: int = Field(2048 * 2048, ge=64 * 64)
    max_steps: int = Field(100, ge=1)
    max_candidates: int = Field(8, ge=1)


class Generation(Strict):
    quality_presets: dict[str, QualityPreset] = Field(
        default_factory=lambda: {
            "draft": QualityPreset(steps=20, cfg_scale=7.0),
            "standard": QualityPreset(steps=30, cfg_scale=7.5),
            "high": QualityPreset(steps=40, cfg_scale=8.0),
        }
    )
    default_quality: str = "standard"
    default_size: tuple[int, int] = (1024, 1024)
    scheduler: str = "DPMSolverMultistepScheduler"
    limits: Limits = Field(default_factory=Limits)

    @model_validator(mode="after")
    def _check(self) -> "Generation":
        if self.default_quality not in self.quality_presets:
            raise ValueError(
                f"default_quality {self.default_quality!r} is not one of {sorted(self.quality_presets)}"
            )
        return self


class Safety(Strict):
    enable_safety_checker: bool = False
    nsfw_threshold: float = 0.0


class Editing(Strict):
    # edit_image, upscale_image (tiled img2img) and inpainting.
    default_strength: float = Field(0.6, ge=0.0, le=1.0)  # edit_image without a strength
    upscale_strength: float = Field(0.3, ge=0.0, le=1.0)  # low: adds detail, keeps the picture
    upscale_tile: int = Field(1024, ge=64, le=2048)  # img2img tile side: a tile's memory is one such image
    upscale_overlap: int = Field(128, ge=0, le=1024)  # pixels neighbouring tiles share and blend over
    max_upscale_factor: int = Field(4, ge=2, le=8)
    max_upscale_pixels: int = Field(4096 * 4096, ge=64 * 64)  # the upscaled image's size limit
    mask_feather_px: int = Field(4, ge=0, le=64)  # the inpaint mask's edge blends inside the mask


class TinyProfile(Strict):
    # The built-in tiny SDXL-architecture engine: used when no SDXL weights are found, or when
    # profile: tiny. Sizes are small so every feature runs on a CPU in seconds.
    default_size: tuple[int, int] = (128, 128)
    steps_scale: float = Field(0.25, gt=0, le=1.0)  # quality preset steps are scaled down by this
    upscale_tile: int = Field(128, ge=64, le=2048)  # editing.upscale_tile on the tiny engine
    upscale_overlap: int = Field(32, ge=0, le=1024)


class Server(Strict):
    # Relative paths are relative to the data home (MCP_SDXL_HOME, default ~/.mcp-sdxl).
    output_dir: str = "outputs"
    input_dirs: list[str] = Field(default_factory=lambda: ["inputs"])
    preview_max_px: int = Field(768, ge=64, le=1568)
    max_result_bytes: int = Field(900_000, ge=10_000, le=1_048_576)
    queue_limit: int = Field(8, ge=1)
    # A call whose estimated time exceeds this runs as a job (Claude Desktop drops calls after ~60 s).
    job_budget_s: float = Field(45.0, gt=0)
    job_ttl_s: float = Field(24 * 3600, gt=0)


class Performance(Strict):
    # Speed levers applied when the pipeline is loaded on CUDA (see mcp_sdxl/engine/accel.py and
    # docs/bench/ for what each one gained on an H100). The CPU ignores them all.
    channels_last: bool = True
    # Fused QKV projections: no gain measured under CUDA graphs on an H100, +0.6 GiB (diffusers keeps the
    # unfused layers, which LoRAs target).
    fuse_qkv: bool = False
    # Capture the UNet's / ControlNets' forward as CUDA graphs and replay them (same kernels, same image).
    cuda_graphs: bool = True
    # Whose CUDA graphs stay in memory: every kind of call's (base, each ControlNet set, each size: each
    # replays at once) or one kind's (another kind recaptures on its first steps; less VRAM). auto: one
    # kind under hardware.vram_limit_gb or on a card under 24 GiB, every kind otherwise.
    graphs_keep: Literal["auto", "every_kind", "one_kind"] = "auto"
    # torch.compile: off | regional (the transformer blocks of the UNet and ControlNets, compiled on the
    # caller's first image of each size: ~10 s) | full (the whole UNet and ControlNet forwards: on an H200
    # 1.09 s an image against regional's 1.40; with cuda_graphs each new kind of call compiles in a
    # background thread, 20-120 s, while the plain forward serves it as a CUDA graph; without graphs the
    # first image waits). A compile error falls back to the plain forward.
    compile: Literal["off", "regional", "full"] = "full"
    # With compile: full and cuda_graphs, compile the VAE decode too (in the background, after the UNet).
    # Inductor fuses its GroupNorm + SiLU pairs and lays out the convolutions: the eager decode's
    # activations and cuDNN workspaces set the graphs' pool at 2.97 GiB at 1024x1024, compiled 1.43 GiB
    # (H200, session 7; the decode 0.13-0.16 s instead of 0.18).
    compile_vae_decode: bool = True
    # Inductor / Triton caches for compile; relative paths are relative to the data home.
    compile_cache_dir: str = "cache/torch"
    # VAE decode precision: auto follows the VAE's config (SDXL's: float32, it overflows in float16);
    # bfloat16 keeps float32's range at half the cost; float16 only for the fp16-fix VAE.
    vae_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "bfloat16"
    # Swap peft's LoRA wrapper layers out of the model while the fused LoRAs are active.
    strip_lora_wrappers: bool = True
    # cuDNN autotuning of convolutions on first use of each shape.
    cudnn_benchmark: bool = False
    # torch's CUDA allocator maps memory in segments that grow and shrink (PYTORCH_CUDA_ALLOC_CONF
    # expandable_segments): blocks freed by one kind of call fit the next, so less memory sits reserved
    # but unused. H200, session 5: peak reserved 1 ControlNet 15.66 -> 14.35 GiB, 2 ControlNets 17.90 ->
    # 16.61, 2 ControlNets at the same 2.10 s an image. Set once per process when the pipeline loads; an
    # expandable_segments setting in PYTORCH_CUDA_ALLOC_CONF wins.
    expandable_segments: bool = True


class SDXLConfig(Strict):
    profile: Literal["auto", "sdxl", "tiny"] = "auto"
    model: ModelSource = Field(default_factory=ModelSource)
    hardware: Hardware = Field(default_factory=Hardware)
    attention: Attention = Field(default_factory=Attention)
    generation: Generation = Field(default_factory=Generation)
    safety: Safety = Field(default_factory=Safety)
    editing: Editing = Field(default_factory=Editing)
    tiny: TinyProfile = Field(default_factory=TinyProfile)
    performance: Performance = Field(default_factory=Performance)
    server: Server = Field(default_factory=Server)


# ---------------------------------------------------------------- lora_registry.yaml
class LoraEntry(Strict):
    name: str
    lora_path: str  # absolute, or relative to the models root
    default_weight: float = Field(0.8, ge=0.0, le=1.0)
    trigger_words: list[str] = Field(default_factory=list)
    description: str = ""


class LoraRegistry(Strict):
    characters: dict[str, LoraEntry] = Field(default_factory=dict)
    backgrounds: dict[str, LoraEntry] = Field(default_factory=dict)
    styles: dict[str, LoraEntry] = Field(default_factory=dict)

    def kinds(self) -> dict[str, dict[str, LoraEntry]]:
        return {"character": self.characters, "background": self.backgrounds, "style": self.styles}


# ---------------------------------------------------------------- character_presets.yaml
class GenerationParams(Strict):
    steps: int | None = Field(None, ge=1, le=200)
    cfg_scale: float | None = Field(None, ge=0.0, le=30.0)
    size: tuple[int, int] | None = None
    scheduler: str | None = None


class CharacterPreset(Strict):
    character_name: str
    lora_name: str | None = None  # key in lora_registry.characters
    lora_weight: float | None = Field(None, ge=0.0, le=1.0)
    default_style: str | None = None  # key in lora_registry.styles
    base_prompt: str = ""
    negative_prompt: str = ""
    reference_embeddings: list[str] = Field(default_factory=list)  # .npy files
    consistency_threshold: float | None = Field(None, ge=0.0, le=1.0)
    generation_params: GenerationParams = Field(default_factory=GenerationParams)


class CharacterPresets(RootModel[dict[str, CharacterPreset]]):
    root: dict[str, CharacterPreset] = Field(default_factory=dict)


# ---------------------------------------------------------------- controlnet_config.yaml
class ControlNetEntry(Strict):
    model: str  # hub id, local diffusers folder or single .safetensors file
    cache_dir: str | None = None
    default_strength: float = Field(1.0, ge=0.0, le=2.0)
    preprocessor: str = ""


class PosePreprocessing(Strict):
    detect_hands: bool = True
    detect_face: bool = True
    annotator_dir: str | None = None  # controlnet_aux annotator weights, when present locally


class DepthPreprocessing(Strict):
    model_type: str = "DPT_Large"
    # transformers depth-estimation model: local folder or hub id in the local cache.
    model: str | None = None


class CannyPreprocessing(Strict):
    low_threshold: int = Field(100, ge=0, le=255)
    high_threshold: int = Field(200, ge=0, le=255)

    @model_validator(mode="after")
    def _order(self) -> "CannyPreprocessing":
        if self.low_threshold > self.high_threshold:
            raise ValueError("low_threshold must be <= high_threshold")
        return self


class Preprocessing(Strict):
    openpose: PosePreprocessing = Field(default_factory=PosePreprocessing)
    depth: DepthPreprocessing = Field(default_factory=DepthPreprocessing)
    canny: CannyPreprocessing = Field(default_factory=CannyPreprocessing)


class ControlNetConfig(Strict):
    controlnets: dict[Literal["openpose", "depth", "canny"], ControlNetEntry] = Field(default_factory=dict)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
