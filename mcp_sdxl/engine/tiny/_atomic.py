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

from filelock import FileLock
from safetensors import safe_open

MARKER = ".mcp-sdxl-tiny.json"  # inside built folders
STAMP_KEY = "mcp_sdxl_tiny"  # in built .safetensors metadata


def stamp(**params) -> str:
    """Canonical text for build parameters (sorted keys: the same params always give the same stamp)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def dir_stamp(folder: Path) -> str | None:
    try:
        return (Path(folder) / MARKER).read_text()
    except OSError:
        return None


def file_stamp(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(STAMP_KEY)
    except Exception:  # missing, truncated or foreign file: treat as not built
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
            os.replace(name, dest)
        finally:
            Path(name).unlink(missing_ok=True)
    return dest
