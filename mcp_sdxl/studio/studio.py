"""The studio: one engine, one image store, one face checker, one GPU lease, one job queue.

This is what the MCP tools call. It plans a request (fast, no GPU), queues it, and the engine
worker runs it: take the GPU lease, prepare controls, generate each candidate, save, score, rank.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from mcp_sdxl.config import Settings
from mcp_sdxl.errors import CancelledError, NotFoundError, UserInputError, shown
from mcp_sdxl.store import ImageStore, StoredImage
from mcp_sdxl.studio import editing
from mcp_sdxl.studio.jobs import Job, JobQueue
from mcp_sdxl.studio.planning import Plan, Planner, Problems, model_ref
from mcp_sdxl.studio.results import ControlUsed, FaceCheck, GenerationResult, ImageInfo, JobInfo, LoraUsed

log = logging.getLogger(__name__)


class Studio:
    def __init__(self, settings: Settings):
        from mcp_sdxl.consistency import ConsistencyChecker
        from mcp_sdxl.engine import Engine
        from mcp_sdxl.lease import GpuLease

        self.settings = settings
        self.store = ImageStore(settings.output_dir, settings.input_dirs)
        self.engine = Engine(settings)
        self.planner = Planner(settings, self.engine.profile)
        self.checker = ConsistencyChecker(settings.consistency, settings.models_root)
        lease_config = settings.lease
        if lease_config.runtime_dir is not None and not Path(lease_config.runtime_dir).is_absolute():
            lease_config = lease_config.model_copy(update={"runtime_dir": settings.data_path(lease_config.runtime_dir)})
        self.lease = GpuLease(lease_config)
        server = settings.sdxl.server
        self.jobs = JobQueue(server.queue_limit, server.job_ttl_s, on_idle=self._arm_idle_release)
        self._idle_timer: threading.Timer | None = None
        self._gpu_lock = threading.RLock()
        # the job generating now (the worker runs one at a time); unlike the queue's own running marker it
        # is clear by the time the worker's idle hook runs, which carries out a deferred release_gpu
        self._running_job: str | None = None
        self._deferred_release: tuple[str, bool] | None = None  # release_gpu's (mode, wake_llm) while one ran
        self.recovery = self.lease.recover()  # wake an LLM that a crashed holder left asleep

    # ------------------------------------------------------------------ catalogue
    def list_characters(self) -> dict[str, Any]:
        registry = self.settings.loras
        characters = []
        for name in self.planner.character_names():
            preset = self.planner.preset(name)
            characters.append({
                "name": name,
                "display_name": preset.character_name,
                "lora": preset.lora_name,
                "lora_weight": preset.lora_weight,
                "default_style": preset.default_style,
                "base_prompt": preset.base_prompt,
                "negative_prompt": preset.negative_prompt,
                "trigger_words": registry.characters[preset.lora_name].trigger_words if preset.lora_name else [],
                "consistency_threshold": preset.consistency_threshold,
                "reference_embeddings": len(self._reference_paths(name, preset)),
                "generation_params": preset.generation_params.model_dump(exclude_none=True),
            })

        def entries(kind: str, table: dict) -> list[dict]:
            out = []
            for key, entry in table.items():
                path = self.settings.model_path(entry.lora_path)
                out.append({
                    "name": key,
                    "display_name": entry.name,
                    "default_weight": entry.default_weight,
                    "trigger_words": entry.trigger_words,
                    "lora_path": str(path),
                    "lora_file_present": self.engine.profile == "tiny" or path.is_file(),
                })
            return out

        lora_tables = {k: entries(k, t) for k, t in registry.kinds().items()}
        from mcp_sdxl.engine.preprocess import list_pose_presets

        return {
            "characters": characters,
            "backgrounds": lora_tables["background"],
            "styles": lora_tables["style"],
            "missing_lora_files": [e["lora_path"] for t in lora_tables.values() for e in t if not e["lora_file_present"]],
            "quality_presets": {k: v.model_dump() for k, v in self.settings.sdxl.generation.quality_presets.items()},
            "pose_presets": list_pose_presets(self.settings.poses_dir),
            "controlnets": sorted(self.settings.controlnet.controlnets),
            "profile": self.engine.profile,
            "model": self.engine.model_name,
            "input_dirs": [str(p) for p in self.store.input_dirs],
        }

    def pose_presets(self) -> list[str]:
        from mcp_sdxl.engine.preprocess import list_pose_presets

        return list_pose_presets(self.settings.poses_dir)

    def _reference_paths(self, name: str, preset) -> list[Path]:
        try:
            backend = self.checker.backend_name
        except Exception:  # no face backend at all: nothing to count
            return []
        return self.checker.store.stored_paths(name, backend) + [
            self.settings.model_path(p) for p in preset.reference_embeddings if self.settings.model_path(p).is_file()
        ]

    # ------------------------------------------------------------------ planning
    def plan_character(self, **arguments) -> Plan:
        return self.planner.plan(kind="character", **arguments)

    def plan_control(self, *, pose_image, pose_preset, pose_strength, depth_image, depth_strength, canny_image,
                     canny_strength, preprocess, prompt, **arguments) -> Plan:
        """generate_with_control's plan. Everything is checked before the call queues or takes the GPU (a
        mistyped path must not put the LLM to sleep), and one error names every problem."""
        problems = Problems()
        controls = self.planner.controls(
            pose_image=pose_image, pose_preset=pose_preset, pose_strength=pose_strength, depth_image=depth_image,
            depth_strength=depth_strength, canny_image=canny_image, canny_strength=canny_strength,
            preprocess=preprocess, problems=problems,
        )
        if isinstance(pose_preset, str) and pose_preset:
            presets = self.pose_presets()
            with problems.check():
                if pose_preset not in presets:
                    raise UserInputError(f"unknown pose_preset {shown(pose_preset)}; use one of {', '.join(presets)}")
        for choice in controls:
            if choice.image_ref:
                with problems.check():
                    self.store.check_image(choice.image_ref)
        return self.planner.plan(kind="control", scene_description=prompt, controls=controls, problems=problems,
                                 **arguments)

    def plan_edit(self, **arguments) -> Plan:
        return editing.plan_edit(self.store, self.planner, **arguments)

    def plan_upscale(self, **arguments) -> Plan:
        return editing.plan_upscale(self.store, self.planner, **arguments)

    def plan_regenerate(self, image_id: str, **overrides) -> Plan:
        return editing.plan_regenerate(self.store, self.planner, image_id, overrides)

    # ------------------------------------------------------------------ generation
    def submit(self, plan: Plan) -> Job:
        return self.jobs.submit(plan.kind, plan.total_steps, lambda job: self._run(job, plan))

    def estimate_seconds(self, plan: Plan) -> float:
        if plan.kind == "upscale":
            per_image = plan.edit.tiles * self.engine.estimate_seconds(*plan.edit.tile, plan.denoise_steps)
        else:
            per_image = self.engine.estimate_seconds(plan.width, plan.height, plan.denoise_steps, len(plan.controls))
        loading = 0.0 if self.engine.state == "ready" else (5.0 if self.engine.profile == "sdxl" else 2.0)
        return per_image * len(plan.seeds) + loading

    def _run(self, job: Job, plan: Plan) -> GenerationResult:
        self._running_job = job.id  # a release_gpu meanwhile waits for the queue to run empty
        try:
            return self._run_plan(job, plan)
        finally:
            self._running_job = None

    def _run_plan(self, job: Job, plan: Plan) -> GenerationResult:
        from mcp_sdxl.engine import ControlInput, GenerationRequest, LoraSpec

        started = time.perf_counter()
        batch = self.store.begin_batch()  # all-or-nothing, also when this process is killed midway
        try:
            lease_s = self.acquire_gpu(purpose=f"{plan.kind} ({job.id})", job=job)
            loras = [
                LoraSpec(f"{lo.kind}:{lo.name}", self.engine.lora_file(lo.kind, lo.name), lo.weight) for lo in plan.loras
            ]
            controls, control_used, control_images = [], [], []
            for choice in plan.controls:
                control_map, source = self._control_map(choice, plan.width, plan.height)
                stored = self.store.save(control_map, {
                    "type": "control_map", "control_type": choice.kind, "source": source,
                    "preprocessed": choice.preprocess, "job_id": job.id,
                }, batch=batch)
                control_images.append(self._info(stored))
                controls.append(ControlInput(choice.kind, control_map, choice.strength))
                control_used.append(ControlUsed(
                    type=choice.kind, strength=choice.strength, source=source,
                    preprocessed=choice.preprocess and choice.pose_preset is None, control_image_id=stored.id,
                ))
            timings: dict[str, float] = {"lease_s": round(lease_s, 4)}
            source, mask = self._edit_inputs(plan)
            per_image = plan.total_steps // len(plan.seeds)
            images: list[StoredImage] = []
            for i, seed in enumerate(plan.seeds):
                request = GenerationRequest(
                    prompt=plan.prompt, negative_prompt=plan.negative_prompt, width=plan.width, height=plan.height,
                    steps=plan.steps, cfg_scale=plan.cfg_scale, seed=seed, scheduler=plan.scheduler, loras=loras,
                    controls=controls, control_start=plan.control_start, control_end=plan.control_end,
                    init_image=source, mask=mask, strength=plan.edit.strength if plan.edit else 1.0,
                    mask_feather_px=self.settings.sdxl.editing.mask_feather_px,
                )
                offset = i * per_image

                def on_step(done: int, total: int, i=i, offset=offset) -> None:
                    done = min(done, total)  # some schedulers call back more often than `steps`
                    job.report(offset + done, f"image {i + 1}/{len(plan.seeds)}, step {done}/{total}")
                    if job.cancel_event.is_set():
                        # Leave the pipeline now: no further step and no VAE decode of a discarded image.
                        raise CancelledError(f"cancelled at image {i + 1}/{len(plan.seeds)}, step {done}/{total}")

                if plan.kind == "upscale":
                    output = self.engine.upscale(request, plan.edit.tile[0], plan.edit.overlap, on_step=on_step,
                                                 cancel=job.cancel_event)
                else:
                    output = self.engine.generate(request, on_step=on_step, cancel=job.cancel_event)
                for key, value in output.timings.items():
                    timings[key] = round(timings.get(key, 0.0) + value, 4)
                metadata = {
                    "type": "generated", "kind": plan.kind, "character": plan.character, "prompt": plan.prompt,
                    "negative_prompt": plan.negative_prompt, "seed": seed, "steps": plan.steps,
                    "cfg_scale": plan.cfg_scale, "scheduler": plan.scheduler, "width": plan.width,
                    "height": plan.height, "quality": plan.quality, "profile": self.engine.profile,
                    "model": self.engine.model_name,
                    "loras": [lo.model_dump() for lo in _loras_used(plan)],
                    "controls": [c.model_dump() for c in control_used],
                    "control_start": plan.control_start, "control_end": plan.control_end,
                    "timings": output.timings, "job_id": job.id, "request": plan.request_record(seed),
                    **_edit_fields(plan),
                }
                if job.cancel_event.is_set():
                    raise CancelledError(f"cancelled after image {i + 1}/{len(plan.seeds)}")
                stored = self.store.save(output.image, metadata, batch=batch)
                images.append(stored)
                job.partial.append(stored.id)

            infos = [self._info(s) for s in images]
            summary = None
            if plan.character and plan.filter_consistency:
                infos, summary = self._rank_by_face(plan, images, infos)
            timings["total_s"] = round(time.perf_counter() - started, 4)
            if job.cancel_event.is_set():
                raise CancelledError("cancelled while scoring; nothing was kept")
            self.store.commit(batch)
            return self.planned_result(
                plan, images=infos, control_images=control_images, controls=control_used,
                consistency_summary=summary, timings=timings,
                message=_done_message(plan, len(infos)) + (" by the tiny engine (random weights: images are not meaningful)" if self.engine.profile == "tiny" else ""),
            )
        except BaseException:
            # A failed or cancelled call leaves nothing behind in the store.
            self.store.discard(batch)
            raise

    def planned_result(self, plan, **fields) -> GenerationResult:
        """A result with the plan's parameters (prompt, LoRAs, size, steps...): the finished call's, and a
        queued job's, so a model reads what it asked for, not empty defaults."""
        return GenerationResult(
            character=plan.character, prompt=plan.prompt, negative_prompt=plan.negative_prompt, loras=_loras_used(plan),
            quality=plan.quality, steps=plan.steps, cfg_scale=plan.cfg_scale, scheduler=plan.scheduler,
            width=plan.width, height=plan.height, profile=self.engine.profile, model=self.engine.model_name,
            notes=list(plan.notes), **_edit_fields(plan), **fields)

    def _edit_inputs(self, plan: Plan):
        """The source image (at the plan's size; an upscale's at its own) and the mask, for an edit."""
        from PIL import Image

        if plan.edit is None:
            return None, None
        source, _ = self.store.open_image(plan.edit.source_ref)
        if plan.kind == "upscale":
            return source, None
        size = (plan.width, plan.height)
        if source.size != size:
            source = source.resize(size, Image.Resampling.LANCZOS)
        mask = None
        if plan.edit.mask_ref:
            mask = self.store.open_image(plan.edit.mask_ref)[0].convert("L")
            if mask.size != size:
                mask = mask.resize(size, Image.Resampling.NEAREST)
        return source, mask

    def _control_map(self, choice, width: int, height: int):
        from mcp_sdxl.engine.preprocess import PreprocessSettings, prepare_control

        pre = self.settings.controlnet.preprocessing
        model_path = self.settings.model_path
        settings = PreprocessSettings(
            canny_low=pre.canny.low_threshold, canny_high=pre.canny.high_threshold,
            detect_hands=pre.openpose.detect_hands, detect_face=pre.openpose.detect_face,
            annotator_dir=str(model_path(pre.openpose.annotator_dir)) if pre.openpose.annotator_dir else None,
            depth_model=model_ref(pre.depth.model, model_path), presets_dir=self.settings.poses_dir,
        )
        if choice.pose_preset:
            image, source = None, f"pose preset {choice.pose_preset}"
        else:
            image, source = self.store.open_image(choice.image_ref)
            if self.store.is_id(choice.image_ref):  # an id says more to the model than the store's file path
                source = choice.image_ref.strip().removeprefix("sdxl://images/")
        control = prepare_control(
            "pose" if choice.kind == "openpose" else choice.kind, image, preprocess=choice.preprocess,
            width=width, height=height, settings=settings, pose_preset=choice.pose_preset,
        )
        return control, source

    def _rank_by_face(self, plan: Plan, images: list[StoredImage], infos: list[ImageInfo]):
        from PIL import Image

        from mcp_sdxl.consistency import rank_candidates

        preset = self.planner.preset(plan.character)
        try:
            refs = self.checker.references_for(plan.character, preset.reference_embeddings)
        except NotFoundError as exc:
            return infos, f"not scored: {exc}"
        threshold = self.checker.resolve_threshold(plan.threshold, preset.consistency_threshold)
        pictures = [Image.open(s.path).convert("RGB") for s in images]
        ranking = rank_candidates(self.checker.score(pictures, refs, threshold))
        ordered = []
        for cand in ranking.candidates:
            info = infos[cand.index]
            s = cand.score
            info.consistency = FaceCheck(
                face_found=s.face_found, similarity=s.similarity, similarity_best=s.similarity_best,
                similarity_mean=s.similarity_mean, is_match=s.is_match, threshold=s.threshold,
                backend=s.backend, rank=cand.rank,
            )
            ordered.append(info)
        passed = len(ranking.passed_indices)
        summary = (
            f"{passed} of {len(images)} candidate(s) match {plan.character} "
            f"({ranking.candidates[0].score.backend}, threshold {threshold:.3f}); best first"
        )
        if not ranking.any_passed:
            summary += "; none passed, the closest is returned first"
        return ordered, summary

    def _info(self, stored: StoredImage) -> ImageInfo:
        meta = stored.metadata
        width, height = meta.get("width"), meta.get("height")
        if not width:
            from PIL import Image

            with Image.open(stored.path) as img:
                width, height = img.size
        return ImageInfo(id=stored.id, uri=stored.uri, path=str(stored.path), width=width, height=height,
                         seed=meta.get("seed"))

    # ------------------------------------------------------------------ store
    def list_images(self, limit: int = 20) -> dict[str, Any]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 200:
            raise UserInputError(f"limit must be in [1, 200], got {shown(limit)}")
        rows = []
        for image_id in self.store.list_ids(limit):
            meta = self.store.get(image_id).metadata
            rows.append({"id": image_id, "uri": f"sdxl://images/{image_id}", "type": meta.get("type"),
                         "kind": meta.get("kind"), "character": meta.get("character"), "prompt": meta.get("prompt"),
                         "seed": meta.get("seed")})
        return {"images": rows}

    def image_file(self, image_id: str) -> Path:
        return self.store.get(image_id).path

    def image_metadata(self, image_id: str) -> dict[str, Any]:
        return self.store.get(image_id).metadata

    # ------------------------------------------------------------------ jobs
    def job(self, job_id: str) -> Job:
        return self.jobs.get(job_id)

    def job_info(self, job: Job) -> JobInfo:
        summary = job.summary()
        return JobInfo(
            job_id=job.id, kind=job.kind, state=job.state, progress=summary["progress"], error=job.error,
            ahead=self.jobs.ahead_of(job) if job.state == "queued" else 0,
            result=job.result if job.state == "done" else None,
            message={
                "queued": "waiting for the engine; poll get_job",
                "running": (f"waiting for {job.waiting_for}; poll get_job"
                            if job.waiting_for and not summary["progress"] else "generating; poll get_job"),
                "done": "finished: images are in result",
                "failed": f"failed: {job.error}",
                "cancelled": "cancelled; nothing was kept",
            }[job.state],
        )

    # ------------------------------------------------------------------ GPU lease
    def acquire_gpu(self, purpose: str, job: Job | None = None) -> float:
        """Hold the lease and have the engine on its device. Returns seconds spent. `job.waiting_for` says
        which of the two it waits for (get_job shows it: another program may hold the lease for minutes)."""
        with self._gpu_lock:
            self._cancel_idle_release()
            started = time.perf_counter()
            need = None if self.engine.device.type == "cuda" else 0.0
            try:
                if job is not None:
                    job.waiting_for = "the GPU lease (another program may hold the GPU)"
                self.lease.acquire(purpose, need_gb=need)
                if job is not None:
                    job.waiting_for = "the engine to load" if self.engine.state != "ready" else None
                try:
                    self.engine.load()
                except BaseException:
                    self._release_engine("unload")
                    self.lease.release(wake_llm=True)
                    raise
            finally:
                if job is not None:
                    job.waiting_for = None
            return time.perf_counter() - started

    def release_gpu(self, mode: str = "offload", wake_llm: bool = True) -> dict[str, Any]:
        """Give the GPU back now, or, while a job generates, as soon as the queue runs empty.

        Released under a running job, the engine offloaded between two of its images, the lease went and
        the LLM woke, and the job's next image loaded the engine back without the lease (found by a
        hostile-input sweep). Now the release waits for the queue to run empty."""
        if mode not in ("offload", "unload"):
            raise UserInputError(f"mode must be 'offload' or 'unload', got {shown(mode)}")
        with self._gpu_lock:
            running = self._running_job
            if running is not None:
                self._deferred_release = (mode, bool(wake_llm))
                return {
                    "mode": mode, "deferred": True, "running_job": running,
                    "message": f"job {running} is generating: the GPU is released ({mode}"
                               f"{', LLM woken' if wake_llm else ''}) as soon as the queue is empty; "
                               f"cancel_job('{running}') to release sooner",
                    "lease": self.lease.status().model_dump(mode="json"),
                }
            self._deferred_release = None
            return self._release_now(mode, bool(wake_llm))

    def _release_now(self, mode: str, wake_llm: bool) -> dict[str, Any]:
        with self._gpu_lock:
            self._cancel_idle_release()
            before = self.lease.status().vram
            engine_before = self.engine.state
            started = time.perf_counter()
            engine_s = self._release_engine(mode)
            lease = self.lease.release(wake_llm=bool(wake_llm))
            after = self.lease.status()
            return {
                "mode": mode,
                "engine_state_before": engine_before,
                "engine_state": self.engine.state,
                "engine_release_s": round(engine_s, 4),
                "total_s": round(time.perf_counter() - started, 4),
                "lease": lease,
                "vram_before": before.model_dump() if before else None,
                "vram_after": after.vram.model_dump() if after.vram else None,
                "vram_note": after.vram_note,
                "llm_backend": after.llm_backend,
                "llm_state": after.llm_state,
                "llm_error": after.llm_error,
            }

    def _release_engine(self, mode: str) -> float:
        if mode == "unload" or self.engine.device.type != "cuda":
            # On the CPU there is no VRAM to give back; unload only when asked.
            return self.engine.unload() if mode == "unload" else 0.0
        return self.engine.offload()

    def gpu_status(self) -> dict[str, Any]:
        status = self.lease.status()
        return {
            "lease": status.model_dump(mode="json"),
            "engine": self.engine.status(),
            "queue": self.jobs.snapshot(),
        }

    def _arm_idle_release(self) -> None:
        """Called by the job worker when the queue runs empty, before the job's caller gets its result."""
        idle = self.settings.lease.idle_release_s
        deferred, self._deferred_release = self._deferred_release, None
        if deferred is not None:  # a release_gpu that came while a job generated
            try:
                self._release_now(*deferred)
            except Exception:
                log.exception("deferred release failed")
            return
        if not self.lease.held:
            return
        if idle <= 0:  # "after each job": hand back now, so the result arrives with the LLM awake
            self._idle_release()
            return
        with self._gpu_lock:
            self._cancel_idle_release()
            self._idle_timer = threading.Timer(idle, self._idle_release)
            self._idle_timer.daemon = True
            self._idle_timer.start()

    def _idle_release(self) -> None:
        try:
            log.info("idle for %g s: releasing the GPU", self.settings.lease.idle_release_s)
            self._release_now("offload", wake_llm=True)
        except Exception:
            log.exception("idle release failed")

    def _cancel_idle_release(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close(self) -> None:
        self._cancel_idle_release()
        self.jobs.stop()
        try:
            self._release_now("unload", wake_llm=True)
        except Exception:
            log.exception("release at shutdown failed")

    # ------------------------------------------------------------------ consistency
    def score_images(self, images: list[str], character: str | None, reference_images: list[str] | None,
                     threshold: float | None) -> dict[str, Any]:
        if not images:
            raise UserInputError("images must list at least one image id or path")
        if len(images) > 32 or len(reference_images or []) > 32:
            raise UserInputError("at most 32 images and 32 reference images per call")
        if isinstance(character, str) and not character.strip():
            character = None  # "" is what models send for "no character" (as the generate tools read it)
        preset = self.planner.preset(character) if character is not None else None
        pictures = [self.store.open_image(ref)[0] for ref in images]
        ref_pictures = [self.store.open_image(ref)[0] for ref in reference_images or []]
        if preset is None and not ref_pictures:
            raise UserInputError("give a character (with enrolled references) or reference_images to compare with")
        refs = self.checker.references_for(
            character, preset.reference_embeddings if preset else (), reference_images=ref_pictures
        )
        threshold = self.checker.resolve_threshold(threshold, preset.consistency_threshold if preset else None)
        scores = self.checker.score(pictures, refs, threshold)
        results = []
        for ref, score in zip(images, scores):
            results.append({"image": ref, **score.model_dump()})
        matches = sum(1 for s in scores if s.is_match)
        return {
            "results": results,
            "backend": self.checker.backend_name,
            "threshold": threshold,
            "references": len(refs),
            "summary": f"{matches} of {len(scores)} image(s) match (backend {self.checker.backend_name}, threshold {threshold:.3f})",
        }

    def enroll(self, character: str, images: list[str]) -> dict[str, Any]:
        self.planner.preset(character)
        if not images:
            raise UserInputError("images must list at least one image id or path showing the character's face")
        if len(images) > 32:
            raise UserInputError(f"at most 32 images per call (got {len(images)}); enroll the best few faces")
        files = list(dict.fromkeys(self.store.resolve_input(ref) for ref in images))  # the same file once
        return self._enroll_pictures(character, [self.store.open_image(str(path))[0] for path in files])

    def enroll_files(self, character: str, paths: list[str]) -> dict[str, Any]:
        """`mcp-sdxl enroll`: the same as the tool, for files anywhere on the user's own disk."""
        from mcp_sdxl.consistency import open_image

        self.planner.preset(character)
        if not paths:
            raise UserInputError("give at least one image file showing the character's face")
        files = list(dict.fromkeys(str(Path(p).expanduser().resolve()) for p in paths))
        return self._enroll_pictures(character, [open_image(path) for path in files])

    def _enroll_pictures(self, character: str, pictures: list) -> dict[str, Any]:
        paths = self.checker.enroll(character, pictures)
        return {
            "character": character,
            "backend": self.checker.backend_name,
            "added": [str(p) for p in paths],
            "already_enrolled": len(pictures) - len(paths),  # the same face picture is stored once
            "total_references": len(self.checker.store.stored_paths(character, self.checker.backend_name)),
        }


def _edit_fields(plan: Plan) -> dict[str, Any]:
    """What an edit, an upscale or a regenerate adds to the metadata and the result."""
    fields: dict[str, Any] = {}
    if plan.edit is not None:
        fields.update(source_image=plan.edit.source_ref, strength=plan.edit.strength)
        if plan.edit.mask_ref:
            fields["mask_image"] = plan.edit.mask_ref
        if plan.kind == "upscale":
            fields["upscale_factor"] = plan.edit.upscale_factor
    if plan.regenerated_from:
        fields["regenerated_from"] = plan.regenerated_from
    return fields


def _done_message(plan: Plan, count: int) -> str:
    """What was made, and for an edit or an upscale, how."""
    edit = plan.edit
    if plan.kind == "upscale":
        return (f"upscaled {edit.upscale_factor}x to {plan.width}x{plan.height}: resized (Lanczos), then "
                f"{edit.tiles} tile(s) of {edit.tile[0]}x{edit.tile[1]} repainted by SDXL img2img at strength "
                f"{edit.strength:g} ({plan.denoise_steps} of {plan.steps} steps each), blended over {edit.overlap} px")
    if plan.kind == "edit":
        how = "inpainted (outside the mask the source's pixels are kept)" if edit.mask_ref else "edited (img2img)"
        if edit.strength == 0:
            return f"{count} image(s): strength 0 keeps the source unchanged"
        return f"{count} image(s) {how} at strength {edit.strength:g} ({plan.denoise_steps} of {plan.steps} steps)"
    made = "regenerated" if plan.regenerated_from else "generated"
    return f"{count} image(s) {made}"


def _loras_used(plan: Plan) -> list[LoraUsed]:
    return [LoraUsed(kind=lo.kind, name=lo.name, weight=lo.weight, trigger_words=lo.entry.trigger_words)
            for lo in plan.loras]
