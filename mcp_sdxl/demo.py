"""`mcp-sdxl demo`: the whole agent flow through a real MCP client (stdio), plus an HTML gallery.

It starts `mcp-sdxl serve` as a subprocess, exactly as Claude Desktop or Qwen-Agent would, and
calls the tools an agent would: list characters, generate a character with LoRAs, generate with
a pose (a preset and one taken from a photo), score face consistency, release the GPU.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import anyio

PASS_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES", "MCP_SDXL_CONFIG", "MCP_SDXL_HOME",
            "MCP_SDXL_MODELS", "MCP_SDXL_PROFILE", "PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR")


def run_demo(args) -> int:
    from mcp_sdxl.config import load_settings

    settings = load_settings(args.config_dir, args.home, args.models_root, args.profile)
    out = Path(args.out) if args.out else settings.home / "demo"
    out.mkdir(parents=True, exist_ok=True)
    photo = _sample_photo(settings.input_dirs[0])
    server_args = ["-m", "mcp_sdxl", "serve", "--config-dir", str(settings.config_dir), "--home", str(settings.home),
                   "--models-root", str(settings.models_root)]
    if args.profile:
        server_args += ["--profile", args.profile]
    env = {k: v for k, v in os.environ.items() if k in PASS_ENV or k in ("PATH", "HOME")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    steps = anyio.run(_agent_flow, sys.executable, server_args, env, photo)
    gallery = write_gallery(out, steps, settings.output_dir)
    print(f"demo finished: {sum(1 for s in steps if not s['error'])}/{len(steps)} calls succeeded")
    print(f"images:  {settings.output_dir}")
    print(f"gallery: {gallery}")
    return 0 if all(not s["error"] for s in steps) else 1


def _sample_photo(input_dir: Path) -> str | None:
    """A real photo of a person that ships in an installed package (for pose + face scoring)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"
    if not source.is_file():
        return None
    input_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, input_dir / "astronaut.png")
    return "astronaut.png"


async def _agent_flow(python: str, server_args: list[str], env: dict, photo: str | None) -> list[dict]:
    from mcp import Client, StdioServerParameters

    steps: list[dict] = []
    params = StdioServerParameters(command=python, args=server_args, env=env)
    async with Client(params) as client:

        async def call(title: str, tool: str, arguments: dict) -> dict:
            started = time.perf_counter()
            result = await client.call_tool(tool, arguments)
            text = result.content[0].text if result.content and result.content[0].type == "text" else ""
            try:
                data = json.loads(text)
            except ValueError:
                data = {"text": text}
            # A call estimated past the client's time budget came back as a job: poll it, as an agent does.
            while not result.is_error and data.get("job_id") and data.get("status") in ("queued", "running"):
                await anyio.sleep(1.0)
                polled = await client.call_tool("get_job", {"job_id": data["job_id"]})
                text = polled.content[0].text if polled.content and polled.content[0].type == "text" else ""
                info = json.loads(text) if not polled.is_error else {}
                if polled.is_error or info.get("state") in ("failed", "cancelled"):
                    result, text = polled, info.get("error") or text
                    break
                if info.get("state") == "done":
                    data = info["result"]
            step = {"title": title, "tool": tool, "arguments": arguments, "error": text if result.is_error else None,
                    "data": data, "seconds": round(time.perf_counter() - started, 2)}
            steps.append(step)
            status = "error: " + text[:200] if result.is_error else "ok"
            print(f"[{step['seconds']:6.2f}s] {tool}({json.dumps(arguments)[:90]}) -> {status}", flush=True)
            return data

        catalogue = await call("What can be generated", "list_characters", {})
        names = [c["name"] for c in catalogue["characters"]]
        character = "luca" if "luca" in names else names[0]
        background = catalogue["backgrounds"][0]["name"] if catalogue["backgrounds"] else None
        first = await call("Character with LoRAs (character + background + style)", "generate_character", {
            "character": character, "scene_description": "running on the beach, excited expression",
            "background": background, "num_candidates": 2, "seed": 42, "quality": "draft"})
        await call("Pose from a named preset", "generate_with_control", {
            "character": character, "prompt": "waving hello in the town square", "pose_preset": "waving", "seed": 7})
        if photo:
            await call("Pose taken from a photo", "generate_with_control", {
                "character": character, "prompt": "standing proudly", "pose_image": photo, "seed": 8})
            await call("Edges (canny) from a photo", "generate_with_control", {
                "prompt": "a 3d animated portrait", "canny_image": photo, "canny_strength": 0.8, "seed": 9})
            images = [first["images"][0]["id"], photo] if first.get("images") else [photo]
            await call("Face consistency against a reference photo", "score_consistency", {
                "images": images, "reference_images": [photo]})
        if first.get("images"):
            best = first["images"][0]["id"]
            await call("Edit it: the same scene at night (img2img)", "edit_image", {
                "image": best, "character": character, "prompt": "on the beach at night, moonlight",
                "strength": 0.5, "seed": 11})
            await call("Upscale it 2x (tiled img2img)", "upscale_image", {"image": best, "factor": 2, "seed": 12})
            await call("Regenerate it with another seed", "regenerate", {"image_id": best, "seed": 43})
        await call("Hand the GPU back to the LLM", "release_gpu", {"mode": "offload"})
        await call("GPU and lease state", "gpu_status", {})
    return steps


def write_gallery(out: Path, steps: list[dict], output_dir: Path) -> Path:
    """A self-contained contact sheet: images copied next to index.html, with what made them."""
    cards = []
    for step in steps:
        data = step["data"] if isinstance(step["data"], dict) else {}
        figures = []
        for group in ("images", "control_images"):
            for image in data.get(group, []):
                src = Path(image["path"])
                if src.is_file():
                    shutil.copyfile(src, out / src.name)
                    score = image.get("consistency") or {}
                    caption = f"{image['id']}" + (f"<br>seed {image['seed']}" if image.get("seed") is not None else "")
                    if score:
                        caption += f"<br>face {score.get('similarity')} ({score.get('backend')})"
                    label = "control map" if group == "control_images" else "image"
                    figures.append(f'<figure><img src="{src.name}" alt="{label} {image["id"]}">'
                                   f"<figcaption>{label}: {caption}</figcaption></figure>")
        if "characters" in data:  # the catalogue: names are what a person wants to see
            data = {**data, "characters": [c["name"] for c in data["characters"]],
                    "backgrounds": [b["name"] for b in data.get("backgrounds", [])],
                    "styles": [s["name"] for s in data.get("styles", [])]}
        details = {k: data[k] for k in ("characters", "backgrounds", "styles", "pose_presets") if k in data}
        details |= {k: data[k] for k in ("prompt", "negative_prompt", "loras", "controls", "consistency_summary",
                                        "timings", "profile", "summary", "results", "lease", "engine") if k in data}
        error = f'<p class="error">{html.escape(step["error"])}</p>' if step["error"] else ""
        cards.append(
            f'<section><h2>{html.escape(step["title"])}</h2>'
            f'<p><code>{html.escape(step["tool"])}({html.escape(json.dumps(step["arguments"]))})</code>'
            f' &middot; {step["seconds"]} s</p>{error}<div class="row">{"".join(figures)}</div>'
            f"<pre>{html.escape(json.dumps(details, indent=1))[:6000]}</pre></section>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mcp-sdxl demo</title>
<style>body{{font-family:sans-serif;margin:2em;background:#fafafa}}section{{background:#fff;padding:1em;margin:1em 0;
border-radius:8px;box-shadow:0 1px 3px #0002}}.row{{display:flex;flex-wrap:wrap;gap:1em}}img{{width:256px;height:auto;
image-rendering:pixelated;border:1px solid #ccc}}figure{{margin:0}}figcaption{{font-size:12px;color:#555}}
pre{{font-size:11px;max-height:16em;overflow:auto;background:#f4f4f4;padding:.5em}}.error{{color:#b00}}</style></head>
<body><h1>mcp-sdxl demo</h1><p>{len(steps)} tool calls through a real MCP client over stdio. Images: {html.escape(str(output_dir))}</p>
{"".join(cards)}</body></html>"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
