"""Build-once helpers: atomic renames + a file lock, so concurrent builders never expose half-written assets.

Every asset carries a *stamp* (format version + build parameters). A folder keeps it in a marker file, a
.safetensors file in its header metadata. A matching stamp means "already built": skip. A different stamp
(older format, other seed) means rebuild and swap in atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

MARKER = ".mcp-sdxl-tiny.json"  # inside built folders
STAMP_KEY = "mcp_sdxl_tiny"  # in built .safetensors metadata


def stamp(**params) -> str:
    """Canonical text for build parameters (sorted keys: the same params always give the same stamp)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str]) -> None:
    """safetensors.save_file with a byte-stable header.

    safetensors serialises `__metadata__` from a hash map, so its key order (and the file bytes) changes
    from run to run; re-emitting the header with sorted metadata makes equal inputs give equal files.
    """
    raw = safetensors_bytes(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()  # dict order = original tensor order
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.write(memoryview(raw)[8 + size :])


def dir_stamp(folder: Path) -> str | None:
    try:
        return (Path(folder) / MARKER).read_text()
    except OSError:
        return None


def file_stamp(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(STAMP_KEY)
    except (OSError, SafetensorError):  # missing, truncated or foreign file: treat as not built
        return None


def _lock(dest: Path) -> FileLock:
    # Hidden sibling, so folders scanned for *.safetensors or model dirs never list it.
    return FileLock(str(dest.parent / f".{dest.name}.lock"))


def build_dir_once(dest: Path, wanted: str, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` and rename the result to `dest`, unless `dest` already has the stamp `wanted`."""
    dest = Path(dest)
    if dir_stamp(dest) == wanted:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest):
        if dir_stamp(dest) == wanted:  # another process finished while we waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
        try:
            build(tmp)
            (tmp / MARKER).write_text(wanted)  # written last: a marker means a complete folder
            tmp.chmod(0o755)  # mkdtemp makes it owner-only
            _swap_in_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _swap_in_dir(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    # A folder cannot be replaced in one rename: move the stale one aside first (we hold the lock).
    stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
    os.rename(dest, stale / dest.name)
    os.rename(tmp, dest)
    shutil.rmtree(stale, ignore_errors=True)


def build_file_once(dest: Path, wanted: str, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_file)` (it must embed `wanted` under STAMP_KEY) and atomically replace `dest`."""
    dest = Path(dest)
    if file_stamp(dest) == wanted:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest):
        if file_stamp(dest) == wanted:
            return dest
        handle, name = tempfile.mkstemp(prefix=f".{dest.name}.build-", suffix=".safetensors", dir=dest.parent)
        os.close(handle)
        try:
            build(Path(name))
            if file_stamp(Path(name)) != wanted:
                raise RuntimeError(f"builder for {dest} did not stamp its output")
            os.chmod(name, 0o644)  # mkstemp makes it owner-only
            os.replace(name, dest)
        finally:
            Path(name).unlink(missing_ok=True)
    return dest
