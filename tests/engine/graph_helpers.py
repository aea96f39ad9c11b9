"""Test helpers for the CUDA-graph runner on the CPU: a graph backend stand-in, small modules, the tiny engine."""

from __future__ import annotations

import torch

from mcp_sdxl.engine import cuda_graphs


class CpuGraphs:
    """The four methods of accel.CudaGraphBackend, on the CPU."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def usable(self, tensors) -> bool:
        return True

    def warm_up(self, fn):
        fn()

    def capture(self, fn, pool):
        self.captures += 1
        out = fn()
        return {"fn": fn, "out": out}, out, pool or object()

    def replay(self, graph) -> None:
        self.replays += 1
        fresh = graph["fn"]()
        leaves_new, leaves_old = [], []
        cuda_graphs._flatten(fresh, leaves_new)
        cuda_graphs._flatten(graph["out"], leaves_old)
        for old, new in zip(leaves_old, leaves_new):
            old.copy_(new)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, scale=1.0):
        return {"y": self.lin(x) * 2, "z": x.sum(dim=-1)}


class FakePipe:
    pass


def tiny_engine(tmp_path, tiny_cache):
    """The real tiny engine, a small request, and the image it gives with no graphs installed."""
    import numpy as np

    from mcp_sdxl.config import load_settings
    from mcp_sdxl.engine import Engine, GenerationRequest
    from tests.conftest import CONFIGS

    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny").symlink_to(tiny_cache, target_is_directory=True)
    engine = Engine(load_settings(CONFIGS, home=home, profile="tiny"))
    request = GenerationRequest(prompt="a boy on a beach", width=64, height=64, steps=3, cfg_scale=7.0, seed=3)
    return engine, request, np.asarray(engine.generate(request).image)
