"""One agent flow over every tool, shared by the real-client tests.

Standard library only: it also runs under .venv-qwen's Python (Qwen-Agent, mcp<2). A driver supplies
`call(tool, args) -> Reply`; the flow calls every tool the way an agent would, checks each result
through what the client gives back (the JSON text block: the one thing every client forwards), and
returns a report. Failures raise FlowError with the tool, the arguments and the text the client saw.

The data home must hold the photos that `put_photos` writes (tests/clients/conftest.py does it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TOOLS = {"list_characters", "generate_character", "generate_with_control", "score_consistency",
         "enroll_reference", "get_job", "cancel_job", "gpu_status", "release_gpu", "list_images",
         "edit_image", "upscale_image", "regenerate"}
SMALL = {"width": 64, "height": 64, "steps": 2, "filter_consistency": False}
JOB_TIMEOUT_S = 120


@dataclass
class Reply:
    text: str  # the text blocks joined: what a text-only client (Qwen-Agent) hands the model
    is_error: bool | None  # None: this client does not say (Qwen-Agent drops isError)
    raw: Any = None  # the driver's whole result, for client-specific checks


class FlowError(AssertionError):
    pass


@dataclass
class Flow:
    call: Callable[[str, dict], Reply]
    steps: list[dict] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ helpers
    def _call(self, tool: str, args: dict) -> Reply:
        started = time.monotonic()
        reply = self.call(tool, args)
        self.steps.append({"tool": tool, "args": args, "is_error": reply.is_error,
                           "seconds": round(time.monotonic() - started, 3), "text": reply.text[:400]})
        return reply

    def ok(self, tool: str, args: dict) -> dict:
        reply = self._call(tool, args)
        if reply.is_error:
            raise FlowError(f"{tool}({args}) failed: {reply.text[:3000]}")
        try:
            data = json.loads(reply.text)
        except ValueError:
            raise FlowError(f"{tool}({args}): the text block is not JSON: {reply.text[:3000]!r}") from None
        if not isinstance(data, dict):
            raise FlowError(f"{tool}({args}): JSON text is not an object: {reply.text[:500]!r}")
        return data

    def error(self, tool: str, args: dict, needle: str) -> str:
        """A tool error must reach the model as plain text that says what went wrong."""
        reply = self._call(tool, args)
        if reply.is_error is False:
            raise FlowError(f"{tool}({args}) should fail but returned: {reply.text[:1000]}")
        try:
            json.loads(reply.text)
            raise FlowError(f"{tool}({args}): error text is JSON data, not a message: {reply.text[:500]}")
        except ValueError:
            pass
        if needle.lower() not in reply.text.lower():
            raise FlowError(f"{tool}({args}): error text lacks {needle!r}: {reply.text[:1000]}")
        return reply.text

    def expect(self, condition: bool, what: str, data: Any) -> None:
        if not condition:
            raise FlowError(f"{what}; got: {json.dumps(data, default=str)[:3000]}")

    def wait_job(self, job_id: str, until: tuple[str, ...] = ("done", "failed", "cancelled")) -> dict:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            info = self.ok("get_job", {"job_id": job_id})
            if info["state"] in until:
                return info
            if time.monotonic() > deadline:
                raise FlowError(f"job {job_id} still {info['state']} after {JOB_TIMEOUT_S} s: {info}")
            time.sleep(0.2)

    # ------------------------------------------------------------------ the flow
    def run(self) -> dict:
        chars = self.ok("list_characters", {})
        names = {c["name"] for c in chars["characters"]}
        self.expect({"luca", "alberto"} <= names, "list_characters names luca and alberto", chars)
        self.expect("waving" in chars["pose_presets"], "pose preset 'waving' is listed", chars)
        self.expect(chars["profile"] == "tiny", "the tiny engine answers", chars)

        gen = self.ok("generate_character", {"character": "luca", "scene_description": "waving on the beach",
                                             "seed": 7, **SMALL})
        self.expect(gen["status"] == "done" and gen["images"], "generate_character returns an image", gen)
        image = gen["images"][0]
        self.expect(image["id"].startswith("img_") and (image["width"], image["height"]) == (64, 64),
                    "a 64x64 image with an img_ id", gen)
        self.expect(gen["loras"][0]["name"] == "luca" and "luca" in gen["prompt"], "the character LoRA and prompt", gen)
        self.ids["generated"] = image["id"]

        ctl = self.ok("generate_with_control", {"prompt": "standing in the piazza", "character": "luca",
                                                "pose_preset": "waving", "seed": 8, **SMALL})
        self.expect(ctl["images"] and ctl["controls"][0]["type"] == "openpose", "an openpose-guided image", ctl)
        self.expect(ctl["control_images"] and ctl["control_images"][0]["id"].startswith("img_"),
                    "the pose map is returned", ctl)
        self.ids["controlled"] = ctl["images"][0]["id"]
        self.ids["pose_map"] = ctl["control_images"][0]["id"]

        edited = self.ok("edit_image", {"image": self.ids["generated"], "prompt": "at sunset", "strength": 0.5,
                                        "steps": 4, "seed": 11})
        self.expect(edited["images"] and edited["source_image"] == self.ids["generated"] and edited["strength"] == 0.5,
                    "edit_image returns an image made from the source", edited)
        upscaled = self.ok("upscale_image", {"image": self.ids["generated"], "factor": 2, "quality": "draft"})
        self.expect((upscaled["images"][0]["width"], upscaled["images"][0]["height"]) == (128, 128),
                    "upscale_image doubles 64x64", upscaled)
        again = self.ok("regenerate", {"image_id": self.ids["generated"], "seed": 70})
        self.expect(again["regenerated_from"] == self.ids["generated"] and again["images"][0]["seed"] == 70
                    and again["prompt"] == gen["prompt"], "regenerate keeps the request, takes the new seed", again)
        self.error("edit_image", {"image": "img_20260101-000000_deadbeef", "prompt": "x"}, "no image with id")

        # A generated tiny image has no face: enrolling it must say so in words.
        self.error("enroll_reference", {"character": "luca", "images": [self.ids["generated"]]}, "no detectable face")
        enrolled = self.ok("enroll_reference", {"character": "luca", "images": ["astronaut.png"]})
        self.expect(enrolled["total_references"] >= 1, "the reference is enrolled", enrolled)
        scored = self.ok("score_consistency", {"images": [self.ids["generated"], "astronaut_flipped.jpg"],
                                               "character": "luca"})
        generated, photo = scored["results"]
        self.expect(generated["face_found"] is False and generated["is_match"] is False,
                    "no face in the tiny image is a normal result", scored)
        self.expect(photo["face_found"] and photo["is_match"], "the mirrored photo matches the enrolled face", scored)

        queued = self.ok("generate_character", {"character": "alberto", "scene_description": "on a vespa",
                                                "seed": 9, "run_as_job": True, **SMALL})
        self.expect(queued["status"] == "queued" and queued["job_id"], "run_as_job returns a job id at once", queued)
        done = self.wait_job(queued["job_id"])
        self.expect(done["state"] == "done" and done["result"]["images"], "the job finishes with an image", done)
        self.ids["from_job"] = done["result"]["images"][0]["id"]

        # Enough steps that the job is still running when cancel_job arrives (tiny: ~3 s).
        slow = self.ok("generate_character", {"character": "luca", "scene_description": "slow", "seed": 10,
                                              "run_as_job": True, **SMALL, "steps": 100})
        cancelled = self.ok("cancel_job", {"job_id": slow["job_id"]})
        self.expect(cancelled["state"] == "cancelled", "cancel_job stops a running job", cancelled)
        again = self.ok("get_job", {"job_id": slow["job_id"]})
        self.expect(again["state"] == "cancelled", "get_job reports the cancelled job", again)
        self.error("get_job", {"job_id": "job_nope"}, "no job")

        listed = self.ok("list_images", {"limit": 10})
        listed_ids = {row["id"] for row in listed["images"]}
        for key in ("generated", "controlled", "from_job"):
            self.expect(self.ids[key] in listed_ids, f"list_images shows the {key} image", listed)

        status = self.ok("gpu_status", {})
        self.expect(status["engine"]["profile"] == "tiny" and "state" in status["lease"], "gpu_status", status)
        released = self.ok("release_gpu", {"mode": "offload"})
        self.expect("lease" in released and "engine_state" in released, "release_gpu reports what it did", released)
        after = self.ok("gpu_status", {})
        self.expect(after["lease"]["state"] == "free", "the lease is free after release_gpu", after)

        called = {s["tool"] for s in self.steps}
        self.expect(called == TOOLS, "every tool was called", sorted(called))
        return {"steps": self.steps, "ids": self.ids}


def run_flow(call: Callable[[str, dict], Reply]) -> dict:
    return Flow(call).run()


def put_photos(input_dir, astronaut_png) -> None:
    """Real face photos in the server's input folder: astronaut.png, a mirrored smaller copy, and a
    faceless gradient. Uses Pillow (the main environment's; not needed under .venv-qwen)."""
    from pathlib import Path

    from PIL import Image, ImageOps

    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    with Image.open(astronaut_png) as img:
        astronaut = img.convert("RGB")
    astronaut.save(input_dir / "astronaut.png")
    ImageOps.mirror(astronaut).resize((384, 384)).save(input_dir / "astronaut_flipped.jpg", quality=85)
    Image.linear_gradient("L").convert("RGB").save(input_dir / "no_face.png")
