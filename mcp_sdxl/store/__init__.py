"""Images and their metadata on disk.

Each image is `<output_dir>/<id>.png` with its parameters embedded (an A1111-style `parameters` text
chunk that other SD tools read, plus the full JSON under `mcp_sdxl`) and a `<id>.json` sidecar.
Writes go to a temp file in the same folder and are renamed into place, sidecar first, PNG last:
an id exists exactly when its PNG exists, so nothing half-written is ever visible.

The images of one generation call are all-or-nothing: before each of them lands, its id is appended
to a journal (`.batch-<pid>-<token>.pending`); the call commits (journal removed) when it succeeded
and discards (images and journal removed) when it failed or was cancelled. A process killed in between
leaves the journal, and the next store opened on the folder removes what it lists. Temp files and
journals carry the writer's pid, so a second live process on the same folder is never swept.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from mcp_sdxl.errors import ConfigError, NotFoundError, UserInputError, shown

ID_RE = re.compile(r"img_\d{8}-\d{6}_[0-9a-f]{8}")  # always fullmatch: `$` would accept a trailing newline
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_INPUT_PIXELS = 64_000_000  # refuse decompression bombs in input images
MAX_REF_CHARS = 1024  # longer "paths" are not paths (file names are capped at 255 bytes anyway)


@dataclass(frozen=True)
class StoredImage:
    id: str
    path: Path
    metadata: dict[str, Any]

    @property
    def uri(self) -> str:
        return f"sdxl://images/{self.id}"


class ImageStore:
    def __init__(self, output_dir: Path, input_dirs: list[Path] | None = None):
        self.output_dir = Path(output_dir)
        self.input_dirs = [Path(p) for p in input_dirs or []]
        self._lock = threading.Lock()
        for folder, key in [(self.output_dir, "output_dir"), *((f, "input_dirs") for f in self.input_dirs)]:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"sdxl_config.yaml: server.{key}: cannot use {folder} as a folder ({exc.strerror or exc}); "
                    "point it at a writable folder"
                ) from exc
        self._sweep_leftovers()

    # ------------------------------------------------------------------ batches (all-or-nothing)
    def begin_batch(self) -> Batch:
        """A journal for the images of one call; pass it to save(), then commit() or discard()."""
        return Batch(self.output_dir / f".batch-{os.getpid()}-{secrets.token_hex(4)}.pending")

    def commit(self, batch: Batch) -> None:
        batch.path.unlink(missing_ok=True)

    def discard(self, batch: Batch) -> None:
        """Remove every image the batch saved, then its journal. Never raises: it runs while an error
        is on its way to the caller (a journal that cannot be removed is swept at the next start)."""
        for image_id in batch.ids:
            _remove(self.output_dir / f"{image_id}.png", self.output_dir / f"{image_id}.json")
        _remove(batch.path)

    # ------------------------------------------------------------------ writing
    def save(self, image: Image.Image, metadata: dict[str, Any], batch: Batch | None = None) -> StoredImage:
        """Write `image` + `metadata` atomically and return its new id (journaled in `batch` first)."""
        image_id = f"img_{time.strftime('%Y%m%d-%H%M%S')}_{secrets.token_hex(4)}"
        metadata = {"id": image_id, "created_at": time.time(), **metadata}
        text = json.dumps(metadata, indent=2, default=str)

        png_info = PngImagePlugin.PngInfo()
        png_info.add_text("parameters", a1111_parameters(metadata))
        png_info.add_text("mcp_sdxl", text)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info)

        png_path = self.output_dir / f"{image_id}.png"
        json_path = self.output_dir / f"{image_id}.json"
        try:
            if batch is not None:
                batch.add(image_id)
            _atomic_write(json_path, text.encode())
            _atomic_write(png_path, buffer.getvalue())
        except OSError as exc:
            _remove(json_path, png_path)  # the folder may be gone: cleaning up must not hide the cause
            raise UserInputError(
                f"cannot write to the output folder {self.output_dir}: {exc.strerror or exc}. "
                "Free some disk space or point server.output_dir in sdxl_config.yaml at a writable folder."
            ) from exc
        return StoredImage(image_id, png_path, metadata)

    def delete(self, image_id: str) -> None:
        self._check_id(image_id)
        (self.output_dir / f"{image_id}.png").unlink(missing_ok=True)
        (self.output_dir / f"{image_id}.json").unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    def get(self, image_id: str) -> StoredImage:
        self._check_id(image_id)
        png_path = self.output_dir / f"{image_id}.png"
        if not png_path.exists():
            raise NotFoundError(f"no image with id {shown(image_id)} in the store; use an id returned by a generation tool")
        json_path = self.output_dir / f"{image_id}.json"
        metadata = None
        try:
            metadata = json.loads(json_path.read_text())
        except (OSError, ValueError):
            pass
        if not isinstance(metadata, dict):  # a sidecar edited by hand ("text", [1, 2]) must not break listings
            metadata = _embedded_metadata(png_path)
        if not isinstance(metadata, dict):
            metadata = {"id": image_id}
        return StoredImage(image_id, png_path, metadata)

    def list_ids(self, limit: int = 100) -> list[str]:
        files = sorted(self.output_dir.glob("img_*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.stem for p in files[:limit] if ID_RE.fullmatch(p.stem)]

    def open_image(self, ref: str) -> tuple[Image.Image, str]:
        """Open an input image given as a store id or a path under the input folders.

        Returns the RGB image and a short description of where it came from.
        """
        path = self.check_image(ref)
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), str(path)
        except Exception as exc:  # PIL raises many types for bad files (a truncated one only when decoded)
            raise UserInputError(f"{shown(ref)}: not a readable image ({type(exc).__name__}: {exc})") from exc

    def check_image(self, ref: str) -> Path:
        """What open_image refuses short of decoding the pixels (a call is checked before it queues): the
        reference resolves inside the allowed folders and the file is an image of a usable size."""
        path = self.resolve_input(ref)
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception as exc:  # PIL raises many types for bad files
            raise UserInputError(f"{shown(ref)}: not a readable image ({type(exc).__name__}: {exc})") from exc
        if width * height > MAX_INPUT_PIXELS:
            raise UserInputError(f"{shown(ref)}: image is too large ({width}x{height})")
        return path

    def resolve_input(self, ref: str) -> Path:
        """Map an id or a path to a real file, confined to the store and the input folders."""
        if not isinstance(ref, str) or not ref.strip():
            raise UserInputError("image reference must be a non-empty string: a store id or a path")
        ref = ref.strip()
        if len(ref) > MAX_REF_CHARS or "\x00" in ref:
            raise UserInputError(
                f"{ref[:80]!r}...: not an image id or a usable path (too long or contains a NUL character)"
            )
        if ref.startswith("sdxl://images/"):
            ref = ref.removeprefix("sdxl://images/")
        if ID_RE.fullmatch(ref):
            return self.get(ref).path
        roots = [self.output_dir, *self.input_dirs]
        candidate = Path(os.path.expanduser(ref))
        candidates = [candidate] if candidate.is_absolute() else [root / candidate for root in roots]
        for path in candidates:
            try:
                real = path.resolve()  # follows symlinks, so a link pointing outside is caught below
                if not any(real.is_relative_to(root.resolve()) for root in roots):
                    continue
                is_file = real.is_file()
            except (OSError, RuntimeError, ValueError):  # name too long, symlink loop, odd bytes
                continue
            if is_file:
                if real.suffix.lower() not in IMAGE_SUFFIXES:
                    raise UserInputError(f"{ref}: not an image file (use one of {sorted(IMAGE_SUFFIXES)})")
                return real
        allowed = ", ".join(str(r) for r in roots)
        raise UserInputError(
            f"{shown(ref)} is not an image id or a file under the allowed folders ({allowed}). "
            "Copy the image into an input folder and pass its name, or pass an id from a previous result."
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def is_id(ref) -> bool:
        """Whether `ref` names a stored image (an id or its sdxl:// URI) rather than a file path."""
        return isinstance(ref, str) and ID_RE.fullmatch(ref.strip().removeprefix("sdxl://images/")) is not None

    def _check_id(self, image_id: str) -> None:
        if not isinstance(image_id, str) or not ID_RE.fullmatch(image_id):
            raise UserInputError(f"{shown(image_id)} is not an image id (ids look like img_20261125-101500_1a2b3c4d)")

    def _sweep_leftovers(self) -> None:
        """Remove what a killed writer left: temp files, the images of calls that never finished
        (journals), and sidecars whose PNG never landed. Live writers (other pids) are left alone."""
        for tmp in self.output_dir.glob(".*.tmp"):
            if not _writer_alive(tmp.name):
                tmp.unlink(missing_ok=True)
        for journal in self.output_dir.glob(".batch-*.pending"):
            if _writer_alive(journal.name):
                continue
            try:
                ids = journal.read_text().split()
            except OSError:
                ids = []
            for image_id in ids:
                if ID_RE.fullmatch(image_id):
                    self.delete(image_id)
            journal.unlink(missing_ok=True)
        for sidecar in self.output_dir.glob("img_*.json"):
            if not sidecar.with_suffix(".png").exists():
                sidecar.unlink(missing_ok=True)


class Batch:
    """The ids one call saved so far, mirrored in a journal file (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.ids: list[str] = []

    def add(self, image_id: str) -> None:
        self.ids.append(image_id)
        with open(self.path, "a", encoding="ascii") as handle:
            handle.write(image_id + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _writer_alive(name: str) -> bool:
    """Whether the process that owns a temp file or journal (pid in its name) still runs."""
    match = re.search(r"[.-](\d+)-[0-9a-f]+\.(?:tmp|pending)$", name)
    if not match:
        return False  # old-style name without a pid: a leftover
    pid = int(match.group(1))
    if pid == os.getpid():
        return False  # a new store in this process has written nothing yet: a previous life's pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _embedded_metadata(png_path: Path) -> dict[str, Any] | None:
    """The JSON embedded in the PNG (when its sidecar is missing or unreadable)."""
    try:
        with Image.open(png_path) as img:
            return json.loads(img.text.get("mcp_sdxl", "null"))
    except Exception:  # noqa: BLE001 - a damaged file simply has no metadata
        return None


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:  # e.g. the folder was replaced by a file
            pass


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The `parameters` text other Stable Diffusion tools (A1111, Civitai, ComfyUI readers) parse."""
    lines = [str(meta.get("prompt", ""))]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields = {
        "Steps": meta.get("steps"),
        "Sampler": meta.get("scheduler"),
        "CFG scale": meta.get("cfg_scale"),
        "Seed": meta.get("seed"),
        "Size": f"{meta.get('width')}x{meta.get('height')}" if meta.get("width") else None,
        "Model": meta.get("model"),
        "Denoising strength": meta.get("strength"),  # img2img / inpaint / upscale, as A1111 writes it
        "Hires upscale": meta.get("upscale_factor"),
    }
    loras = meta.get("loras") or []
    if loras:
        fields["Lora weights"] = ", ".join(f"{lo['name']}: {lo['weight']}" for lo in loras)
    controls = meta.get("controls") or []
    if controls:
        fields["ControlNet"] = ", ".join(f"{c['type']}: {c['strength']}" for c in controls)
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def encode_preview(image: Image.Image, max_px: int, max_bytes: int) -> tuple[bytes, str]:
    """A small inline preview (WebP, JPEG fallback) within `max_px` on the long side and `max_bytes`."""
    preview = image.convert("RGB")
    if max(preview.size) > max_px:
        preview.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    for quality in (80, 65, 50, 35):
        for fmt, mime in (("WEBP", "image/webp"), ("JPEG", "image/jpeg")):
            buffer = io.BytesIO()
            try:
                preview.save(buffer, format=fmt, quality=quality)
            except (OSError, KeyError):
                continue  # this Pillow has no WebP encoder
            if buffer.tell() <= max_bytes:
                return buffer.getvalue(), mime
        preview.thumbnail((max(64, preview.width * 3 // 4), max(64, preview.height * 3 // 4)))
    buffer = io.BytesIO()
    preview.thumbnail((64, 64))
    preview.save(buffer, format="JPEG", quality=30)
    return buffer.getvalue(), "image/jpeg"


def encode_jpeg(image: Image.Image, max_bytes: int) -> bytes:
    """The whole image as a JPEG within `max_bytes` (quality first, then size): a full PNG at 1024x1024 is
    ~2.4 MB, 3.2 MB as base64, over what Claude Desktop accepts in one message (1 MiB)."""
    picture = image.convert("RGB")
    while True:
        for quality in (92, 85, 75, 60):
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=quality)
            if buffer.tell() <= max_bytes or max(picture.size) <= 64:
                return buffer.getvalue()
        picture = picture.resize((max(64, picture.width * 3 // 4), max(64, picture.height * 3 // 4)),
                                 Image.Resampling.LANCZOS)
