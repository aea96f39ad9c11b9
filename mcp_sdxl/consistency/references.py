"""Reference embeddings on disk: <root>/<character>/<backend>/<n>.npy.

One folder per backend because ArcFace (512-d) and SFace (128-d) vectors live in different spaces:
comparing across them is meaningless even when the sizes happen to match.
A .npy file holds one embedding (shape (d,)) or several (shape (k, d)).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np

from mcp_sdxl.errors import UserInputError, shown

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_character_name(name: str) -> str:
    # The name becomes a folder: refuse separators and dot-dot so it cannot escape the store.
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise UserInputError(
            f"invalid character name {shown(name)}: use 1-64 letters, digits, '_', '-' or '.', "
            "like the keys in character_presets.yaml"
        )
    return name


def normalise(vector: np.ndarray) -> np.ndarray | None:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-12:
        return None
    return vector / norm


def _order(path: Path) -> tuple[int, int, str]:
    # Numeric names in numeric order (2 before 10), any other .npy files after them.
    return (0, int(path.stem), path.name) if path.stem.isdigit() else (1, 0, path.name)


class ReferenceStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, character: str, backend: str) -> Path:
        return self.root / check_character_name(character) / backend

    def stored_paths(self, character: str, backend: str) -> list[Path]:
        folder = self.folder(character, backend)
        return sorted(folder.glob("*.npy"), key=_order) if folder.is_dir() else []

    def characters(self, backend: str) -> list[str]:
        """Characters that have at least one reference file for this backend."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and any((p / backend).glob("*.npy")))

    @staticmethod
    def load(paths: list[Path], dim: int, backend: str) -> tuple[list[np.ndarray], list[str]]:
        """Load and normalise every embedding; files that do not fit are skipped and described."""
        vectors: list[np.ndarray] = []
        problems: list[str] = []
        for path in paths:
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                problems.append(f"{path}: not a readable .npy file ({exc})")
                continue
            rows = array.reshape(1, -1) if array.ndim == 1 else array
            if rows.ndim != 2 or rows.shape[1] != dim:
                problems.append(f"{path}: shape {tuple(array.shape)}, but {backend} embeddings are {dim}-d")
                continue
            good = [v for v in (normalise(r) for r in rows) if v is not None]
            if len(good) < len(rows):
                problems.append(f"{path}: {len(rows) - len(good)} zero or non-finite vector(s) skipped")
            vectors.extend(good)
        return vectors, problems

    def save(self, character: str, backend: str, vectors: list[np.ndarray]) -> list[Path]:
        """Write each vector as the next free <n>.npy, atomically (temp file, then link/rename)."""
        folder = self.folder(character, backend)
        folder.mkdir(parents=True, exist_ok=True)
        existing = [int(p.stem) for p in folder.glob("*.npy") if p.stem.isdigit()]
        number = max(existing, default=0) + 1
        written = []
        for vector in vectors:
            fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".enroll-", suffix=".tmp")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, np.asarray(vector, dtype=np.float32))
                    fh.flush()
                    os.fsync(fh.fileno())
                number, target = self._claim(tmp, folder, number)
            finally:
                tmp.unlink(missing_ok=True)
            written.append(target)
            number += 1
        return written

    @staticmethod
    def _claim(tmp: Path, folder: Path, number: int) -> tuple[int, Path]:
        # os.link fails if the name exists, so two processes enrolling at once never overwrite each
        # other's file; filesystems without hard links fall back to an atomic rename.
        while True:
            target = folder / f"{number:03d}.npy"
            try:
                os.link(tmp, target)
                return number, target
            except FileExistsError:
                number += 1
            except OSError:
                if target.exists():
                    number += 1
                    continue
                os.replace(tmp, target)
                return number, target
