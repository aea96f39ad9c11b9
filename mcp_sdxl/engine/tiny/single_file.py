"""Diffusers -> original (SGM/LDM) key names, and Civitai/A1111-style single-file SDXL checkpoints.

Ported from diffusers' scripts/convert_diffusers_to_original_sdxl.py, but driven by the UNet/VAE config
instead of SDXL's hard-coded block counts, so the same code serves the tiny profile and full-size SDXL.
Kohya LoRA names reuse the UNet mapping (Kohya SDXL files name UNet modules the SGM way).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ._atomic import save_safetensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."  # OpenAI CLIP-L: HF names kept
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG: open_clip names

_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def unet_prefix_map(config) -> dict[str, str]:
    """diffusers module prefix -> SGM prefix for a UNet2DConditionModel config (SD/SDXL topology)."""
    n = config["layers_per_block"]
    prefixes = dict(_UNET_TOP_LEVEL)
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(n):
            block = (n + 1) * i + j + 1  # input_blocks.0 is conv_in; each level adds n layers + 1 downsample
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{block}.0."
            if "CrossAttn" in kind:
                prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{block}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(n + 1) * (i + 1)}.0.op."
    for i, kind in enumerate(config["up_block_types"]):
        has_attention = "CrossAttn" in kind
        for j in range(n + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(n + 1) * i + j}.0."
            if has_attention:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(n + 1) * i + j}.1."
        prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(n + 1) * i + n}.{2 if has_attention else 1}."
    prefixes.update(
        {
            "mid_block.resnets.0.": "middle_block.0.",
            "mid_block.attentions.0.": "middle_block.1.",
            "mid_block.resnets.1.": "middle_block.2.",
        }
    )
    return prefixes


def to_sgm_unet_name(name: str, prefixes: dict[str, str]) -> str:
    """Rename one diffusers UNet parameter or module name (e.g. a LoRA target) to its SGM name."""
    for hf_prefix, sd_prefix in prefixes.items():
        if name.startswith(hf_prefix):
            rest = name[len(hf_prefix) :]
            if ".resnets." in hf_prefix:
                head, _, tail = rest.partition(".")
                rest = _UNET_RESNET_PARTS.get(head, head) + ("." + tail if tail else "")
            return sd_prefix + rest
    return name


def convert_unet(state_dict: dict, config) -> dict:
    prefixes = unet_prefix_map(config)
    return {UNET_PREFIX + to_sgm_unet_name(k, prefixes): v for k, v in state_dict.items()}


def _vae_prefix_map(config) -> dict[str, str]:
    levels, n = len(config["block_out_channels"]), config["layers_per_block"]
    prefixes = {}
    for i in range(levels):
        for j in range(n):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        up = levels - 1 - i  # LDM numbers decoder levels from the bottom
        for j in range(n + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{up}.block.{j}."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{up}.upsample."
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        prefixes[f"{part}.conv_norm_out."] = f"{part}.norm_out."
    return prefixes


_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def convert_vae(state_dict: dict, config) -> dict:
    prefixes = _vae_prefix_map(config)
    converted = {}
    for key, value in state_dict.items():
        new = key
        for hf_prefix, sd_prefix in prefixes.items():
            if key.startswith(hf_prefix):
                new = sd_prefix + key[len(hf_prefix) :]
                break
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            for hf_part, sd_part in _VAE_ATTENTION_PARTS.items():
                new = new.replace(f".attn_1.{hf_part}.", f".attn_1.{sd_part}.")
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        converted[VAE_PREFIX + new] = value
    return converted


def hf_clip_name(name: str) -> str:
    """transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); files everywhere still use the prefix."""
    if name.startswith(("text_model.", "text_projection")):
        return name
    return "text_model." + name


def convert_text_encoder(state_dict: dict) -> dict:
    # Non-persistent buffers (position_ids) are rebuilt by the loader; everything else keeps HF names.
    return {TEXT_ENCODER_PREFIX + hf_clip_name(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}


_OPENCLIP_LEAVES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER_PARTS = [
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    (".self_attn.", ".attn."),
]


def convert_text_encoder_2(state_dict: dict) -> dict:
    """CLIPTextModelWithProjection -> open_clip layout (fused in_proj, transposed text_projection)."""
    converted, qkv = {}, {}
    for key, value in state_dict.items():
        key = hf_clip_name(key)
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            converted["text_projection"] = value.T.contiguous()  # open_clip computes x @ proj
            continue
        if key in _OPENCLIP_LEAVES:
            converted[_OPENCLIP_LEAVES[key]] = value
            continue
        for hf_part, sd_part in _OPENCLIP_LAYER_PARTS:
            key = key.replace(hf_part, sd_part)
        for proj in ("q", "k", "v"):
            marker = f".attn.{proj}_proj."
            if marker in key:
                layer, _, kind = key.partition(marker)  # kind: weight | bias
                qkv.setdefault((layer, kind), {})[proj] = value
                break
        else:
            converted[key] = value
    for (layer, kind), parts in qkv.items():
        converted[f"{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {TEXT_ENCODER_2_PREFIX + k: v for k, v in converted.items()}


def _read_components(source):
    """(unet_sd, unet_config, vae_sd, vae_config, te_sd, te2_sd) from a pipeline or a diffusers folder."""
    if isinstance(source, (str, Path)):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        root = Path(source)
        return (
            load_file(root / "unet" / "diffusion_pytorch_model.safetensors"),
            UNet2DConditionModel.load_config(root, subfolder="unet"),
            load_file(root / "vae" / "diffusion_pytorch_model.safetensors"),
            AutoencoderKL.load_config(root, subfolder="vae"),
            load_file(root / "text_encoder" / "model.safetensors"),
            load_file(root / "text_encoder_2" / "model.safetensors"),
        )
    return (
        source.unet.state_dict(),
        source.unet.config,
        source.vae.state_dict(),
        source.vae.config,
        source.text_encoder.state_dict(),
        source.text_encoder_2.state_dict(),
    )


def ldm_state_dict(source) -> dict[str, torch.Tensor]:
    """All weights of an SDXL pipeline (object or diffusers folder) under original checkpoint names."""
    unet, unet_config, vae, vae_config, te, te2 = _read_components(source)
    return {
        **convert_unet(unet, unet_config),
        **convert_vae(vae, vae_config),
        **convert_text_encoder(te),
        **convert_text_encoder_2(te2),
    }


def save_single_file(
    source, dest_file: Path | str, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
) -> Path:
    """Write a Civitai/A1111-style SDXL .safetensors from a StableDiffusionXLPipeline or a diffusers folder.

    Load it offline with StableDiffusionXLPipeline.from_single_file(file, config=<diffusers folder with the
    matching configs + tokenizers>, local_files_only=True): without `config=` diffusers fetches SDXL-base
    configs from the hub.
    """
    tensors = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in ldm_state_dict(source).items()}
    dest = Path(dest_file)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, dest, {"format": "pt", **(metadata or {})})
    return dest
