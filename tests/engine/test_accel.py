"""CUDA-graph bookkeeping (mcp_sdxl.engine.accel.GraphRunner) and its memory policy, on the CPU.

The runner decides when to capture, which graph serves a call, when graphs are stale and when their
memory is given back. That logic is exercised here with a CPU backend that "captures" a function and
"replays" it by running it again on the static inputs and writing into the captured outputs, which is
what a CUDA graph replay does. The CUDA kernels themselves are checked on the GPU by `mcp-sdxl bench`
(its output check compares every engine image with plain diffusers).
"""

from __future__ import annotations

import dataclasses

import torch

from mcp_sdxl.engine import accel
from tests.engine.graph_helpers import CpuGraphs, FakePipe, Net, tiny_engine


def _runner(**kwargs):
    pipe, net, backend = FakePipe(), Net(), CpuGraphs()
    state = accel.state_of(pipe)
    runner = accel.install_graphs(state, net, net.forward, name="net", backend=backend, **kwargs)
    return pipe, net, runner, backend


@torch.inference_mode()
def test_second_call_of_a_signature_captures_and_replays_match_eager():
    pipe, net, runner, backend = _runner()
    eager = Net.forward.__get__(net)
    xs = [torch.randn(2, 4) for _ in range(4)]
    outs = [net(x) for x in xs]
    assert runner.stats["eager"] == 1 and runner.stats["captures"] == 1 and runner.stats["replays"] == 3
    for x, out in zip(xs, outs):
        want = eager(x)
        assert torch.allclose(out["y"], want["y"]) and torch.allclose(out["z"], want["z"])
    # outputs are copies: a later replay does not change what an earlier call returned
    first = outs[1]["y"].clone()
    net(torch.randn(2, 4))
    assert torch.equal(outs[1]["y"], first)
    # another shape is another signature: eager once, then its own graph
    net(torch.randn(3, 4)), net(torch.randn(3, 4))
    assert len(runner.entries) == 2 and backend.captures == 2


@torch.inference_mode()
def test_moved_or_replaced_weights_drop_the_graphs():
    pipe, net, runner, backend = _runner()
    x = torch.randn(2, 4)
    net(x), net(x)
    assert runner.entries
    net.lin.weight = torch.nn.Parameter(torch.randn(4, 4))  # a reload: new storage
    accel.state_of(pipe).version += 1  # what lora_update / a reload announce
    out = net(x)
    assert torch.allclose(out["y"], net.lin(x) * 2)  # the new weights, not the captured ones
    assert runner.stats["resets"] == 1


@torch.inference_mode()
def test_scale_argument_shares_one_graph_across_strengths():
    pipe, net, runner, backend = _runner(scale_arg=(1, "scale"))
    x = torch.randn(2, 4)
    base = Net.forward.__get__(net)(x)
    outs = {s: net(x, scale=s) for s in (1.0, 0.5, 0.25, 2.0)}
    assert backend.captures == 1
    for s, out in outs.items():
        assert torch.allclose(out["y"], base["y"] * s)


@torch.inference_mode()
def test_one_family_policy_drops_graphs_of_another_kind_of_call():
    pipe, net, runner, backend = _runner()
    x = torch.randn(2, 4)
    accel.begin_call(pipe, ("base", 1024))
    net(x), net(x)
    accel.begin_call(pipe, ("canny", 1024))  # default: every kind keeps its graphs
    assert runner.entries
    state = accel.state_of(pipe)
    state.one_family = True  # a VRAM cap (hardware.vram_limit_gb)
    accel.begin_call(pipe, ("canny", 1024))  # same kind: kept
    assert runner.entries
    accel.begin_call(pipe, ("base", 1024))  # another kind: its pool is given back first
    assert not runner.entries and state.pool[0] is None
    net(x), net(x)
    assert runner.entries  # the new kind captures again


@torch.inference_mode()
def test_out_of_memory_gives_back_graphs_then_stops_capturing():
    pipe, net, runner, backend = _runner()
    x = torch.randn(2, 4)
    assert accel.after_oom(pipe) is False  # nothing held: eager alone did not fit, nothing to retry
    net(x), net(x)
    assert accel.after_oom(pipe) is True
    state = accel.state_of(pipe)
    assert not runner.entries and state.one_family and not state.captures_off
    net(x), net(x)  # one kind of call may still capture
    assert runner.entries
    assert accel.after_oom(pipe) is True  # struck again with one kind only
    assert state.captures_off
    for _ in range(3):
        out = net(x)
    assert not runner.entries and backend.captures == 2  # eager from now on
    assert torch.allclose(out["y"], net.lin(x) * 2)


class OomOnce(CpuGraphs):
    """Replays fail once with CUDA's out-of-memory error, as a graph pool too many can make them."""

    def __init__(self):
        super().__init__()
        self.fail = False

    def replay(self, graph) -> None:
        if self.fail:
            self.fail = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        super().replay(graph)


def test_engine_gives_back_graph_memory_and_retries_the_same_image(tmp_path, tiny_cache):
    """The real tiny pipeline with its UNet under a GraphRunner: an out-of-memory error during a replay
    drops the graphs and the call reruns, giving the image it would have given."""
    import numpy as np

    engine, request, want = tiny_engine(tmp_path, tiny_cache)
    backend = OomOnce()
    unet = engine.pipe.unet
    runner = accel.install_graphs(accel.state_of(engine.pipe), unet, unet.forward, name="unet", backend=backend)
    assert np.array_equal(np.asarray(engine.generate(request).image), want)  # captured, replayed: same image
    assert runner.entries and backend.replays >= 1
    backend.fail = True
    steps = []
    again = engine.generate(request, on_step=lambda done, total: steps.append(done))
    assert np.array_equal(np.asarray(again.image), want)
    state = accel.state_of(engine.pipe)
    assert state.one_family and not state.captures_off and runner.stats["resets"] == 1
    assert steps[-1] == 3
    # unloading after the retry frees the pipeline: nothing of the failed attempt keeps it alive
    import gc
    import weakref

    gone = weakref.ref(engine.pipe.unet)
    del unet, runner, state  # the test's own references (the runner holds the UNet's forward)
    engine.unload()
    gc.collect()
    assert gone() is None


def test_leak_diagnosis_names_what_keeps_a_model_alive():
    """The bench's referrer_chains (run after every unload on the GPU): it follows a kept exception's
    traceback to the frame that held the model, and reports attribute and key names on the way."""
    from mcp_sdxl.bench.engine_runs import referrer_chains

    model = torch.nn.Linear(2, 2)
    kept: dict = {}

    def fails(m):
        raise ValueError("boom")

    try:
        fails(model)
    except ValueError as exc:
        kept["error"] = exc
    holder = FakePipe()
    holder.unet = model
    found = {"keep": holder}
    chains = referrer_chains(model)
    assert any("traceback" in c and "ValueError" in c and "dict['error']" in c for c in chains), chains
    assert any("FakePipe" in c and "dict['keep']" in c for c in chains), chains
    del found, kept


def test_unet_steps_outside_the_controlnet_window_replay_the_base_graph(tmp_path, tiny_cache):
    """Outside its window a ControlNet pipeline calls the UNet with residuals=None: the same call as the
    base pipeline's, so it replays the base graph (no third signature to capture, or to compile)."""
    import numpy as np
    from PIL import Image

    from mcp_sdxl.engine import ControlInput

    engine, request, _ = tiny_engine(tmp_path, tiny_cache)
    request.steps = 4
    edges = Image.new("RGB", (request.width, request.height))
    edges.paste((255, 255, 255), (16, 16, 48, 48))
    windowed = dataclasses.replace(request, controls=[ControlInput("canny", edges, 1.0)], control_end=0.5)
    want = np.asarray(engine.generate(windowed).image)  # no graphs yet: the plain forward's image
    unet = engine.pipe.unet
    runner = accel.install_graphs(accel.state_of(engine.pipe), unet, unet.forward, name="unet", backend=CpuGraphs())
    engine.generate(request)  # the base signature: eager, then captured
    assert runner.stats["captures"] == 1
    got = np.asarray(engine.generate(windowed).image)  # 2 steps with residuals, 2 without
    assert runner.stats["captures"] == 2 and len(runner.entries) == 2
    assert np.array_equal(got, want)


def test_zero_residuals_make_base_and_controlnet_calls_one_unet_signature(tmp_path, tiny_cache):
    """With the UNet always given residuals (zeros without a ControlNet), a base call and a ControlNet call
    share one captured graph (one compile with compile: full), and both images stay exactly as they were."""
    import numpy as np
    from PIL import Image

    from mcp_sdxl.engine import ControlInput

    engine, request, base_want = tiny_engine(tmp_path, tiny_cache)
    edges = Image.new("RGB", (request.width, request.height))
    edges.paste((255, 255, 255), (16, 16, 48, 48))
    controlled = dataclasses.replace(request, controls=[ControlInput("canny", edges, 1.0)], control_end=0.5)
    control_want = np.asarray(engine.generate(controlled).image)
    unet = engine.pipe.unet
    runner = accel.install_graphs(accel.state_of(engine.pipe), unet, unet.forward, name="unet", backend=CpuGraphs())
    zeros = accel.state_of(engine.pipe).zero_residuals
    unet.forward = accel.with_zero_residuals(unet, unet.forward, zeros)
    assert np.array_equal(np.asarray(engine.generate(request).image), base_want)  # eager, then captured
    assert runner.stats["captures"] == 1
    assert np.array_equal(np.asarray(engine.generate(controlled).image), control_want)
    assert np.array_equal(np.asarray(engine.generate(request).image), base_want)
    assert runner.stats["captures"] == 1 and len(runner.entries) == 1  # steps with and without residuals
    down, mid = accel.residual_shapes(unet, (2, 4, 13, 9))  # odd sizes: each downsampler rounds up
    h, w = 13, 9
    for _ in unet.config.block_out_channels[1:]:
        h, w = -(-h // 2), -(-w // 2)
    blocks = len(unet.config.block_out_channels)  # conv_in, each block's resnets, each downsampler but the last
    assert down[-1][2:] == mid[2:] == (h, w) and len(down) == 1 + unet.config.layers_per_block * blocks + blocks - 1
    accel.release(engine.pipe)
    assert zeros == {}  # the zeros go with the weights


def test_compile_caches_go_under_the_configured_folder(tmp_path, monkeypatch):
    """Importing diffusers makes torch write its default cache folder into TORCHINDUCTOR_CACHE_DIR; the
    configured compile_cache_dir still wins over that default, and a folder the user set wins over both."""
    import os

    import diffusers  # noqa: F401 (what sets torch's default)
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    accel.configure_compile_cache(tmp_path / "torch")
    assert cache_dir() == str(tmp_path / "torch" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "torch" / "triton")
    mine = str(tmp_path / "mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    accel.configure_compile_cache(tmp_path / "torch")
    assert cache_dir() == mine


@torch.inference_mode()
def test_a_kind_of_call_that_runs_out_of_memory_alone_goes_graphless_and_the_others_keep_capturing():
    """Under one kind's graphs (a VRAM cap), an out-of-memory error turns graphs off for that kind only:
    measured under a 15.5 GiB cap, two ControlNets ran out with their own graphs, and the base image,
    whose graphs fit, then ran without graphs too (1.35 s instead of 1.11 s) while this was one switch."""
    pipe, net, runner, backend = _runner()
    state = accel.state_of(pipe)
    state.one_family = True
    x = torch.randn(2, 4)
    accel.begin_call(pipe, "two ControlNets")
    net(x), net(x)
    assert runner.entries
    assert accel.after_oom(pipe) is True
    assert state.captures_off and not runner.entries
    for _ in range(3):
        net(x)
    assert not runner.entries  # this kind runs without graphs
    accel.begin_call(pipe, "base")
    assert not state.captures_off
    net(x), net(x)
    assert runner.entries and backend.captures == 2  # the base kind captures again
    accel.begin_call(pipe, "two ControlNets")  # and going back drops them: that kind stays graphless
    assert not runner.entries and state.captures_off
