"""Speed levers for CUDA: memory layout, fused attention projections, torch.compile."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def optimize_pipeline(pipe, performance, device: torch.device) -> None:
    """Apply the configured levers. On the CPU (tiny engine, tests) nothing changes."""
    if device.type != "cuda":
        return
    if performance.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
