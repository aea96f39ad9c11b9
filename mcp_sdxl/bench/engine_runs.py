"""The engine under test: lever variants, LoRA switching, lease-style release, cold starts in fresh processes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

from mcp_sdxl.bench.assets import Assets
from mcp_sdxl.bench.plan import (
    EDIT_SCENARIOS,
    NEGATIVE,
    PROCESS_T0,
    PROMPT,
    SEED,
    VARIANTS,
    Plan,
    Vram,
    _free,
    _sync,
    compare,
    log,
    lora_set,
    measure,
    scenario_inputs,
)
from mcp_sdxl.bench.report import Report


# ------------------------------------------------------------------------------------------------ engine
def engine_settings(settings, assets: Assets, overrides: dict | None, vram_limit_gb: float | None = None):
    from mcp_sdxl.config.models import ControlNetEntry, Performance

    sdxl = settings.sdxl.model_copy(deep=True)
    if vram_limit_gb is not None:  # the engine's own cap and graph-memory policy (hardware.vram_limit_gb)
        sdxl.hardware.vram_limit_gb = vram_limit_gb
    if assets.kind == "random":
        sdxl.profile = "sdxl"
        sdxl.model.base_model = str(assets.model_dir)
        sdxl.model.variant = None
        sdxl.model.vae = None
    if overrides:
        sdxl.performance = Performance(**{**sdxl.performance.model_dump(), **overrides})
    controlnet = settings.controlnet.model_copy(deep=True)
    if assets.kind != "tiny":
        for kind, path in assets.controlnets.items():
            controlnet.controlnets[kind] = ControlNetEntry(model=str(path))
    return dataclasses.replace(settings, sdxl=sdxl, controlnet=controlnet)


def engine_request(plan: Plan, assets: Assets, inputs: dict):
    from mcp_sdxl.engine import ControlInput, GenerationRequest, LoraSpec

    start, end = inputs.get("window", (0.0, 1.0))
    factor = inputs.get("factor", 1)  # an upscale's request is at the output size, its source at the plan's
    return GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=plan.width * factor, height=plan.height * factor,
        steps=plan.steps, cfg_scale=plan.cfg, seed=SEED, scheduler="DPMSolverMultistepScheduler",
        loras=[LoraSpec(f"bench:{a}", assets.loras[a], w) for a, w in inputs["loras"]],
        controls=[ControlInput(kind=k, image=img, strength=s) for k, img, s in inputs["controls"]],
        control_start=start, control_end=end, init_image=inputs.get("source"), mask=inputs.get("mask"),
        strength=inputs.get("strength", 1.0),
    )


def run_engine_variant(settings, plan: Plan, assets: Assets, maps: dict, vram: Vram, report: Report,
                       name: str, scenarios, overrides, ref_images: dict, main: bool) -> None:
    from mcp_sdxl.engine import Engine, accel

    out = report.data["engine"].setdefault(name, {})
    v_settings = engine_settings(settings, assets, overrides, plan.vram_limit_gb)
    out["performance"] = v_settings.sdxl.performance.model_dump()
    cudnn_before = _cudnn_benchmark()
    engine = Engine(v_settings)
    try:
        vram.reset()
        out["load_s"] = round(engine.load(), 3)
        out["resident"] = vram.now()
        out["attention"] = engine.attention_backends()
        out["levers_applied"] = dict(accel.state_of(engine.pipe).applied)
        report.save()
        todo = [s for s in ("base", "loras3") if s in scenarios]
        if main and "loras3" in scenarios:
            todo.append("lora_switch")
        todo += [s for s in ("cn1", "cn2") if s in scenarios]
        if main and "cn1" in scenarios and not plan.quick:
            todo.append("cn1_window")
        if main and "base" in scenarios and not plan.quick:
            todo.append("base_callback")
        todo += [s for s in EDIT_SCENARIOS if s in scenarios]
        for scenario in todo:
            if plan.left() < 40:
                out.setdefault("scenarios", {})[scenario] = {"skipped": "time budget"}
                continue
            try:
                if scenario == "lora_switch":
                    out["lora_switch"] = _lora_switch(engine, plan, assets)
                    continue
                callback = None
                if scenario == "base_callback":  # the studio's kind of progress callback
                    progress = []
                    callback = lambda done, total: progress.append((done, time.perf_counter()))  # noqa: E731
                inputs = scenario_inputs("base" if scenario == "base_callback" else scenario, assets, maps)
                request = engine_request(plan, assets, inputs)

                def once(request=request, callback=callback, scenario=scenario):
                    if scenario == "upscale2x":
                        tile = v_settings.sdxl.editing if engine.profile == "sdxl" else v_settings.sdxl.tiny
                        output = engine.upscale(request, tile.upscale_tile, tile.upscale_overlap)
                    else:
                        output = engine.generate(request, on_step=callback)
                    return output.image, output.timings

                result = measure(plan, vram, once, settle=lambda: accel.wait_for_compiles(
                    engine.pipe, timeout=max(0.0, plan.left() - 60)), busy=lambda: accel.compiling(engine.pipe),
                    changes=lambda: graph_changes(engine.pipe))
                image = result.pop("_image")
                ref_name = "base" if scenario == "base_callback" else scenario
                ref = report.data["reference"].get(ref_name, {})
                if ref_name == "loras3" and "loras3_fused" in ref_images:
                    # diffusers' fuse_lora: the engine's arithmetic (fused weights); vs unfused peft for the record
                    result["output_check"] = compare(image, ref_images["loras3_fused"])
                    result["output_check_vs_unfused_reference"] = compare(image, ref_images["loras3"])
                elif ref_name in ref_images:
                    result["output_check"] = compare(image, ref_images[ref_name])
                if isinstance(ref, dict) and ref.get("median_s"):
                    result["speedup_vs_reference"] = round(ref["median_s"] / result["median_s"], 3)
                out.setdefault("scenarios", {})[scenario] = result
                if scenario == "base" and main:
                    ref_images.setdefault("_engine_base", image)
                log.info("engine %s %s: %.3f s/image", name, scenario, result["median_s"])
            except Exception as exc:
                out.setdefault("scenarios", {})[scenario] = {"error": report.error(f"engine/{name}/{scenario}", exc)}
            report.save()
        out["graphs"] = accel.graph_stats(engine.pipe) if engine.pipe is not None else {}
        if engine.pipe is not None:
            st = accel.state_of(engine.pipe)
            out["graph_policy"] = {"one_family": st.one_family, "graphless": [repr(f) for f in st.graphless]}
        if main and plan.left() > 60:
            release = out["release"] = {}
            try:
                _release_cycle(engine, plan, assets, maps, vram, release)
            except Exception as exc:
                release["error"] = report.error(f"engine/{name}/release", exc)
    except Exception as exc:
        out["error"] = report.error(f"engine/{name}", exc)
    finally:
        with contextlib.suppress(Exception):
            engine.unload()
        del engine
        _free()
        _set_cudnn_benchmark(cudnn_before)
        if out.get("levers_applied", {}).get("expandable_segments"):
            accel.set_expandable_segments(False)  # the next variant starts as configured
        out["after_unload"] = vram.now()
        report.save()


def graph_changes(pipe) -> tuple:
    """What a steady call does not change: each runner's captures, resets and compiles."""
    from mcp_sdxl.engine import accel

    out = []
    for name, stats in sorted(accel.graph_stats(pipe).items()):
        compile_stats = stats.get("background_compile", {})
        out.append((name, stats.get("captures", 0), stats.get("resets", 0), compile_stats.get("compiles", 0),
                    compile_stats.get("failures", 0)))
    return tuple(out)


def _cudnn_benchmark() -> bool:
    import torch

    return torch.backends.cudnn.benchmark


def _set_cudnn_benchmark(value: bool) -> None:
    import torch

    torch.backends.cudnn.benchmark = value


def _lora_switch(engine, plan: Plan, assets: Assets) -> dict:
    """Switch character (weights change), then back, then change a weight: the engine's lora_s each time."""
    from mcp_sdxl.engine import accel

    out = {}
    steps = [("switch_to_new_character_first_time", lora_set(assets, "char_b")),
             ("switch_back_to_loaded_character", lora_set(assets, "char_a")),
             ("change_character_weight", lora_set(assets, "char_a", 0.6)),
             ("to_no_lora", []),
             ("back_to_3_loras", lora_set(assets, "char_a"))]
    if plan.quick:
        steps = steps[:2]
    for label, loras in steps:
        request = engine_request(plan, assets, {"loras": loras, "controls": []})
        _sync()
        started = time.perf_counter()
        output = engine.generate(request)
        _sync()
        out[label] = {"lora_s": output.timings.get("lora_s"), "image_s": round(time.perf_counter() - started, 4),
                      "breakdown": dict(accel.state_of(engine.pipe).applied.get("last_lora_update_s", {}))}
    return out


def _release_cycle(engine, plan: Plan, assets: Assets, maps: dict, vram: Vram, out: dict) -> dict:
    """Lease-style: offload to pinned CPU RAM and back (twice: the first allocates the pinned buffers),
    unload and reload, with VRAM left after each release and the image checked against the one before.
    Fills `out` as it goes, so a failure keeps what was measured before it."""
    out["before"] = vram.now()
    request = engine_request(plan, assets, scenario_inputs("base", assets, maps))
    images = {}

    def image_s(label):
        _sync()
        t0 = time.perf_counter()
        images[label] = engine.generate(request).image
        _sync()
        return round(time.perf_counter() - t0, 4)

    image_s("before")
    for cycle in ("", "_again"):
        out[f"offload{cycle}_s"] = round(engine.offload(), 3)
        out[f"after_offload{cycle}"] = vram.now()
        out[f"reacquire_from_cpu{cycle}_s"] = round(engine.load(), 3)
        out[f"first_image_after_reacquire{cycle}_s"] = image_s(f"reacquire{cycle}")
    out["second_image_after_reacquire_s"] = image_s("reacquire_2")
    unet = weakref.ref(engine.pipe.unet)
    out["unload_s"] = round(engine.unload(), 3)
    out["after_unload"] = vram.now()
    if unet() is not None:  # the engine let go of it, something else did not: say what (a leak diagnosis)
        out["unet_still_referenced_by"] = referrer_chains(unet())
    out["reload_from_disk_s"] = round(engine.load(), 3)
    out["first_image_after_reload_s"] = image_s("reload")
    out["second_image_after_reload_s"] = image_s("reload_2")
    checks = {k: compare(images["before"], v) for k, v in images.items() if k != "before"}
    out["same_image_after"] = {k: c["identical"] for k, c in checks.items()}
    # compile: full serves the plain forward until a reloaded UNet is compiled again: close, not identical
    out["image_mean_abs_diff_after"] = {k: c["mean_abs"] for k, c in checks.items()}
    return out


def referrer_chains(obj, max_nodes: int = 400, limit: int = 8, seconds: float = 20.0) -> list[str]:
    """Paths from `obj` to what keeps it alive (a leak diagnosis): breadth-first over gc referrers, each
    object visited once (cycles cost nothing), ending at roots: running frames, module globals, objects of
    torch's compiler packages (dynamo / inductor caches), or objects nothing visible to gc refers to."""
    import gc
    import types
    from collections import deque

    def label(ref, child) -> str:
        if isinstance(ref, dict):
            keys = [k for k, v in ref.items() if v is child][:2]
            return f"dict{keys}"
        if isinstance(ref, types.FrameType):
            return f"frame {ref.f_code.co_name} ({Path(ref.f_code.co_filename).name}:{ref.f_lineno})"
        return f"{type(ref).__module__}.{type(ref).__qualname__}"

    running = set()  # frames on some thread's stack; other frames live on through a traceback or generator
    for frame in sys._current_frames().values():
        while frame is not None:
            running.add(id(frame))
            frame = frame.f_back

    def is_root(ref) -> bool:
        if isinstance(ref, types.FrameType):
            return id(ref) in running
        if isinstance(ref, types.ModuleType):
            return True
        if isinstance(ref, dict) and "__name__" in ref and "__builtins__" in ref:
            return True  # a module's globals
        return type(ref).__module__.startswith(("torch._dynamo", "torch._inductor", "torch.fx"))

    here = {id(sys._getframe())}
    seen = {id(obj)}
    queue = deque([(obj, [f"{type(obj).__module__}.{type(obj).__qualname__}"])])
    chains: list[str] = []
    here.add(id(queue))
    stop = time.monotonic() + seconds  # each gc.get_referrers scans the whole heap
    while queue and len(seen) < max_nodes and len(chains) < limit and time.monotonic() < stop:
        node, path = queue.popleft()
        refs = gc.get_referrers(node)
        here.add(id(refs))
        if not any(id(r) not in here for r in refs):
            # nothing gc can see: a local variable of a running function, or C code
            chains.append(" <- ".join(path + ["(a running frame's local or C code)"]))
        for ref in refs:
            if id(ref) in seen or id(ref) in here:
                continue
            if isinstance(ref, types.FrameType) and ref.f_code.co_name == "referrer_chains":
                continue
            step = path + [label(ref, node)]
            if is_root(ref):  # reported along every path that reaches it
                chains.append(" <- ".join(step))
                continue
            seen.add(id(ref))
            here.add(id(step))
            entry = (ref, step)
            here.add(id(entry))
            queue.append(entry)
        del refs
    return chains


# ------------------------------------------------------------------------------------------------ cold start
def run_cold_starts(args, settings, plan: Plan, assets: Assets, report: Report) -> None:
    """Process start to first image, in fresh processes: the first variant's levers (the configured ones
    unless --variants says otherwise) with a cold and then a warm compile cache, and without compile.
    With a background compile (compile: full) each child then waits for it and times one more image: the
    time from process start to the compiled speed; the cold child's compile fills the warm child's cache."""
    out = report.data["cold_start"]
    cache = plan.workdir / f"compile-cache-{os.getpid()}"
    name, _, overrides = plan.variants[0] if plan.variants else ("default", None, None)
    runs = [(f"{name}, cold compile cache", overrides, cache), (f"{name}, warm compile cache", overrides, cache),
            ("no-compile", VARIANTS["no-compile"], None)]
    for label, overrides, cache_dir in runs:
        if plan.left() < 90:
            out[label] = {"skipped": "time budget"}
            continue
        perf = dict(overrides or {})
        if cache_dir is not None:
            perf["compile_cache_dir"] = str(cache_dir)
        spec = {"config_dir": args.config_dir, "home": args.home, "models_root": args.models_root,
                "profile": args.profile, "assets": {"kind": assets.kind, "model_dir": str(assets.model_dir),
                                                    "controlnets": {k: str(v) for k, v in assets.controlnets.items()}},
                "performance": perf, "width": plan.width, "height": plan.height, "steps": plan.steps, "cfg": plan.cfg}
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        timeout = max(60, min(400, plan.left() - 20))
        spec["compile_wait_until_s"] = timeout - 30  # the child stops waiting for a compile in time to report
        started = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "mcp_sdxl.bench", "--child", json.dumps(spec)],
                                  capture_output=True, text=True, env=env, timeout=timeout)
            line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode != 0 or not line:
                raise RuntimeError(f"child exited {proc.returncode}: {proc.stderr[-1500:]}")
            child = json.loads(line[-1])
            result = {k: round(v - started, 3) for k, v in child.pop("at").items()}
            result.update(child)
            result["process_start_to_first_image_s"] = result["first_image"]
            out[label] = result
            log.info("cold start %s: first image after %.1f s", label, result["first_image"])
        except Exception as exc:
            out[label] = {"error": report.error(f"cold_start/{label}", exc)}
        report.save()


def _child(spec_text: str) -> int:
    """A cold-start run in its own process: import, build the engine, load, generate twice; print times."""
    at = {}
    at["python_started"] = PROCESS_T0
    import torch  # noqa: F401

    from mcp_sdxl.config import load_settings
    from mcp_sdxl.engine import Engine

    at["imported"] = time.time()
    spec = json.loads(spec_text)
    settings = load_settings(spec["config_dir"], spec["home"], spec["models_root"], spec["profile"])
    a = spec["assets"]
    assets = Assets(a["kind"], Path(a["model_dir"]) if a["model_dir"] != "None" else None, None, {},
                    {k: Path(v) for k, v in a["controlnets"].items()})
    settings = engine_settings(settings, assets, spec["performance"] or None)
    engine = Engine(settings)
    at["engine_created"] = time.time()
    engine.load()
    at["loaded"] = time.time()
    plan = Plan("cuda", True, spec["width"], spec["height"], spec["steps"], spec["cfg"], 1, 0, False, [], None,
                Path("."), None, False)
    request = engine_request(plan, assets, {"loras": [], "controls": []})
    first = engine.generate(request)
    _sync()
    at["first_image"] = time.time()
    engine.generate(request)
    _sync()
    at["second_image"] = time.time()
    result = {"second_image_s": round(at["second_image"] - at["first_image"], 3)}
    from mcp_sdxl.engine import accel

    state = getattr(engine.pipe, accel.STATE_ATTR, None)
    if state is not None and any(r.compiler is not None for r in state.runners):  # compile: full
        left = spec.get("compile_wait_until_s", 600) - (time.time() - PROCESS_T0)
        accel.wait_for_compiles(engine.pipe, timeout=max(0.0, left))
        result["compile"] = {r.name: dict(r.compiler.stats, busy=r.compiler.busy) for r in state.runners
                             if r.compiler is not None}
        at["compiled"] = time.time()
        for label in ("image_after_compile", "compiled_image"):  # the first captures the compiled graph
            started = time.time()
            engine.generate(request)
            _sync()
            at[label] = time.time()
        result["compiled_image_s"] = round(at["compiled_image"] - started, 3)
    print(json.dumps({"at": at, "first_timings": first.timings, **result}))
    return 0
