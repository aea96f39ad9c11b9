"""`mcp-sdxl bench`: the plain diffusers pipeline against this engine, same weights, same seeds (issue 8).

One process runs, on the same architecture and weights:
- the reference: what the seed's SDXLPipelineManager did (diffusers StableDiffusionXLPipeline in fp16 eager,
  PyTorch SDPA, peft `set_adapters` for LoRAs, StableDiffusionXLControlNetPipeline for ControlNets);
- the engine (`mcp_sdxl.engine.Engine`) in one or more lever variants (`--variants`).
Scenarios: base, 3 LoRAs, 1 ControlNet, 2 ControlNets (plus extras on the first variant: LoRA switching, a
ControlNet window, a step callback, lease-style release and re-acquire). Then cold starts in fresh processes.
Each scenario: seconds per image (median of --repeats after one warm-up), peak VRAM (torch allocated and
reserved, NVML device memory), the engine/reference ratio, and an output check (the engine's image against
the reference's, same seed) within a stated tolerance.

Weights: the configured SDXL weights when they are found; otherwise, on CUDA, full-size SDXL-base shapes with
random weights built on the GPU from the shipped config (latency does not depend on weight values) and saved
as a real diffusers folder, with random rank-32 LoRA files and a full-size random ControlNet; on the CPU (or
with --profile tiny) the tiny engine (a smoke test that runs in seconds).
"""


from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path

from mcp_sdxl.bench.assets import control_images, prepare_assets
from mcp_sdxl.bench.engine_runs import run_cold_starts, run_engine_variant
from mcp_sdxl.bench.plan import (
    DEFAULT_VARIANTS_CUDA,
    PROCESS_T0,
    PROMPT,
    SEED,
    TOLERANCE,
    Plan,
    Vram,
    _free,
    _gib,
    parse_variants,
)
from mcp_sdxl.bench.reference import run_reference
from mcp_sdxl.bench.report import Report, _contact_sheet, render, summarise


# ------------------------------------------------------------------------------------------------ main
def run_bench(args) -> int:
    from mcp_sdxl.config import load_settings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    settings = load_settings(args.config_dir, args.home, args.models_root, args.profile)
    cuda = torch.cuda.is_available() and settings.sdxl.hardware.device != "cpu"
    full = cuda and settings.sdxl.profile != "tiny"
    quick = bool(getattr(args, "quick", False))
    variants_text = getattr(args, "variants", None) or (
        DEFAULT_VARIANTS_CUDA if full and not quick else "default:base+loras3+cn1" if quick else "default:all")
    if full:
        width = height = 1024
        steps, cfg = 30, 7.5
    else:
        width = height = 64 if quick else 128
        steps, cfg = (3 if quick else 8), 7.0
    repeats = 1 if quick else max(1, args.repeats)
    warmups = 0 if quick else 1
    workdir = Path(getattr(args, "workdir", None) or (settings.home / "bench")).expanduser()
    plan = Plan("cuda" if cuda else "cpu", full, width, height, steps, cfg, repeats, warmups, quick,
                parse_variants(variants_text), getattr(args, "budget_s", None), workdir, args.vram_limit_gb,
                cold_start=full and not quick and not getattr(args, "no_cold_start", False))
    report = Report(Path(args.out).expanduser())
    meta = report.data["meta"]
    meta.update(command=" ".join(sys.argv), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=plan.device,
                size=[width, height], steps=steps, cfg=cfg, repeats=repeats, warmups=plan.warmups, quick=quick,
                variants=variants_text, vram_limit_gb=args.vram_limit_gb, tolerance=TOLERANCE, seed=SEED,
                prompt=PROMPT, python=platform.python_version(), torch=torch.__version__,
                scheduler="DPMSolverMultistepScheduler", weights_note=(
                    "random weights decode through the SDXL VAE config (force_upcast: float32 decode) like the "
                    "real model; random weights never overflow in fp16, real SDXL VAE weights do"))
    with contextlib.suppress(Exception):
        import compel
        import diffusers
        import peft
        import transformers

        meta.update(diffusers=diffusers.__version__, transformers=transformers.__version__, peft=peft.__version__,
                    compel=getattr(compel, "__version__", "?"))
    if cuda:
        meta["gpu"] = torch.cuda.get_device_name()
        meta["gpu_total_gib"] = _gib(torch.cuda.get_device_properties(0).total_memory)
    report.save()
    blocks = cuda and bool(getattr(args, "memory_blocks", False))
    if blocks:  # the Python stack of every live allocation (slows eager calls: a diagnostic run)
        torch.cuda.memory._record_memory_history(enabled="state", stacks="python")
    vram = Vram(cuda, blocks=blocks)
    if vram.nvml:
        meta["nvml_baseline_used_gib"] = _gib(vram.baseline)
    failed = False
    try:
        assets = prepare_assets(settings, plan, report)
        maps = control_images(width, height)
        if cuda and args.vram_limit_gb:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_limit_gb * 2**30 / total))
            meta["vram_limit_note"] = (f"torch allocator capped at {args.vram_limit_gb} GiB (reserved memory, "
                                       "set_per_process_memory_fraction); the CUDA context (~0.5 GiB) is outside it")
        if getattr(args, "cold_start_only", False):
            plan.cold_start = full
            if plan.cold_start:
                run_cold_starts(args, settings, plan, assets, report)
            else:
                print("--cold-start-only: cold starts are measured on CUDA with full-size SDXL only", file=sys.stderr)
            return _finish(report, plan, vram, args, failed=False)
        wanted_ref = set()
        for _, scenarios, _ in plan.variants:
            wanted_ref |= set(scenarios)
        if getattr(args, "reference", None):
            wanted_ref = set(args.reference.split("+"))
        meta["reference_scenarios"] = sorted(wanted_ref)
        ref_images = run_reference(settings, plan, assets, maps, vram, report, wanted_ref)
        _free()
        report.data["reference"]["after_release"] = vram.now()
        for i, (name, scenarios, overrides) in enumerate(plan.variants):
            if plan.left() < 60:
                report.data["engine"][name] = {"skipped": "time budget"}
                continue
            run_engine_variant(settings, plan, assets, maps, vram, report, name, scenarios, overrides, ref_images,
                               main=(i == 0))
        if plan.cold_start:
            run_cold_starts(args, settings, plan, assets, report)
        _contact_sheet(ref_images, report)
    except SystemExit:
        vram.close()
        raise
    except Exception as exc:
        report.error("bench", exc)
        failed = True
    return _finish(report, plan, vram, args, failed)


def _finish(report: Report, plan: Plan, vram: Vram, args, failed: bool) -> int:
    vram.close()
    meta = report.data["meta"]
    meta["total_s"] = round(time.time() - PROCESS_T0, 1)
    summary = summarise(report.data, plan)
    report.data["targets"] = summary["targets"]
    report.save()
    text = render(report.data, summary)
    report.path.with_suffix(".md").write_text(text)
    print(text)
    failures = [e for e in report.data["errors"]]
    if args.vram_limit_gb and failures:
        return 1
    return 1 if failed else 0
