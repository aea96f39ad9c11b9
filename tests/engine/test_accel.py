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

from mcp_sdxl.engine import accel, cuda_graphs


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


def test_full_compile_runs_in_the_background_and_never_blocks_a_call(tmp_path, tiny_cache):
    """compile: full on the real tiny pipeline, its UNet under a GraphRunner with a BackgroundCompiler.
    The compile backend is a real torch.compile backend that records its thread and takes its time (the
    full SDXL compile takes minutes): images keep coming at the plain forward's speed meanwhile, nothing
    compiles on the caller's thread, and once compiled the UNet runs the compiled graph, same image."""
    import threading
    import time

    import numpy as np

    from mcp_sdxl.engine.background_compile import BackgroundCompiler

    engine, request, want = tiny_engine(tmp_path, tiny_cache)

    compiled_on, delay = [], 4.0

    def slow_backend(graph_module, example_inputs):
        compiled_on.append(threading.current_thread().name)
        time.sleep(delay)
        return graph_module.forward

    torch._dynamo.reset()
    unet = engine.pipe.unet
    compiler = BackgroundCompiler(torch.compile(unet.forward, backend=slow_backend, dynamic=False), name="unet")
    runner = accel.install_graphs(accel.state_of(engine.pipe), unet, unet.forward, name="unet",
                                  backend=CpuGraphs(), compiler=compiler)
    started = time.perf_counter()
    first = np.asarray(engine.generate(request).image)  # step 2 captures the plain graph, step 3 submits
    first_s = time.perf_counter() - started
    assert compiler.busy and first_s < delay  # the call did not wait for the compile
    assert np.array_equal(first, want)
    assert accel.holds_graphs(engine.pipe) and runner.stats["captures"] == 1
    while_compiling = np.asarray(engine.generate(request).image)  # replays the plain graph meanwhile
    assert np.array_equal(while_compiling, want)
    assert compiler.wait(timeout=300) and compiler.stats["compiles"] == 1 and compiler.ready
    assert compiled_on and all(name == "compile-unet" for name in compiled_on)
    calls = len(compiled_on)
    compiled = np.asarray(engine.generate(request).image)
    assert len(compiled_on) == calls  # the caller's thread ran the compiled graph without compiling anything
    assert runner.stats.get("compiled_eager", 0) >= 1 and runner.stats["captures"] == 2
    assert np.abs(compiled.astype(int) - want.astype(int)).max() <= 1
    stats = accel.graph_stats(engine.pipe)["unet"]["background_compile"]
    assert stats["compiles"] == 1 and not stats["busy"]
    torch._dynamo.reset()


@torch.inference_mode()
def test_background_compiles_run_one_at_a_time_in_a_pipeline():
    """compile: full puts the UNet and each ControlNet under a BackgroundCompiler. While the UNet compiles,
    the ControlNet's signature is served by its plain graph and not handed to its compiler; once the
    UNet's compile is done, the ControlNet's next call starts its own."""
    import threading

    from mcp_sdxl.engine.background_compile import BackgroundCompiler

    gate = threading.Event()
    compiled_names = []

    def gated_backend(graph_module, example_inputs):
        compiled_names.append(threading.current_thread().name)
        gate.wait(60)
        return graph_module.forward

    torch._dynamo.reset()
    pipe = FakePipe()
    state = accel.state_of(pipe)
    nets, compilers, runners = [], [], []
    for name in ("unet", "controlnet1"):
        net = Net()
        compiler = BackgroundCompiler(torch.compile(net.forward, backend=gated_backend, dynamic=False), name=name)
        runners.append(accel.install_graphs(state, net, net.forward, name=name, backend=CpuGraphs(), compiler=compiler))
        nets.append(net)
        compilers.append(compiler)
    x = torch.randn(2, 4)
    nets[1](x), nets[1](x)  # the ControlNet's plain graph first: eager, captured (its next call would submit)
    assert runners[1].entries and not compilers[1].busy
    nets[0](x), nets[0](x), nets[0](x)  # eager, captured, then a replay that hands the signature to the compiler
    assert compilers[0].busy
    replays = runners[1].stats["replays"]
    out = nets[1](x)
    assert runners[1].stats["replays"] == replays + 1  # served by its plain graph meanwhile
    assert not compilers[1].busy and not compilers[1].ready  # and not compiled while the UNet compiles
    assert torch.allclose(out["y"], Net.forward.__get__(nets[1])(x)["y"])
    gate.set()
    assert compilers[0].wait(60) and compilers[0].ready
    nets[1](x)  # nothing compiling now: this replay starts the ControlNet's compile
    assert compilers[1].wait(60) and compilers[1].ready and compilers[1].stats["compiles"] == 1
    # both off the caller's thread (the second reuses dynamo's code for the same forward: no backend call)
    assert compiled_names == ["compile-unet"]
    torch._dynamo.reset()


@torch.inference_mode()
def test_lora_switch_keeps_the_compiled_graph_without_a_new_compile():
    """A LoRA switch changes weights in place and bumps the structure version: the compiled forward's graph
    replays the new weights at once (no background re-compile, no eager steps meanwhile)."""
    import threading

    from mcp_sdxl.engine.background_compile import BackgroundCompiler

    threads = []

    def backend(graph_module, example_inputs):
        threads.append(threading.current_thread().name)
        return graph_module.forward

    torch._dynamo.reset()
    pipe, net = FakePipe(), Net()
    state = accel.state_of(pipe)
    compiler = BackgroundCompiler(torch.compile(net.forward, backend=backend, dynamic=False), name="unet")
    runner = accel.install_graphs(state, net, net.forward, name="unet", backend=CpuGraphs(), compiler=compiler)
    x = torch.randn(2, 4)
    for _ in range(3):
        net(x)
    assert compiler.wait(60) and compiler.stats["compiles"] == 1
    net(x), net(x)  # the compiled forward: once as it is, then captured
    assert any(key[1] for key in runner.entries)
    eager_before = runner.stats["eager"]
    net.lin.weight.mul_(3)  # what a fused LoRA does to a weight, and the version bump lora_update makes
    state.version += 1
    out = net(x)
    assert torch.allclose(out["y"], Net.forward.__get__(net)(x)["y"])  # the new weights
    assert not compiler.busy and compiler.stats["compiles"] == 1 and runner.stats["eager"] == eager_before
    assert threads == ["compile-unet"]
    torch._dynamo.reset()


class ScaledNet(torch.nn.Module):
    """A ControlNet's calling convention: conditioning_scale (5th argument) multiplies every output."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, cond, image, conditioning_scale=1.0, residual=None):
        y = self.lin(x) + (0 if residual is None else residual)
        return ((y * conditioning_scale, (y + 1) * conditioning_scale), y.mean() * conditioning_scale)


@torch.inference_mode()
def test_explicit_none_is_the_same_signature_and_strengths_share_the_compiled_forward():
    """`residual=None` (what a ControlNet pipeline passes outside its window) replays the graph captured
    without it; a strength other than 1.0 runs the compiled forward at 1.0 and scales after: no recompile."""
    import threading

    from mcp_sdxl.engine.background_compile import BackgroundCompiler

    compiles = []

    def backend(graph_module, example_inputs):
        compiles.append(threading.current_thread().name)
        return graph_module.forward

    torch._dynamo.reset()
    pipe, net = FakePipe(), ScaledNet()
    state = accel.state_of(pipe)
    compiler = BackgroundCompiler(torch.compile(net.forward, backend=backend, dynamic=False), name="controlnet")
    runner = accel.install_graphs(state, net, net.forward, name="controlnet", backend=CpuGraphs(),
                                  scale_arg=(4, "conditioning_scale"), compiler=compiler)
    eager = ScaledNet.forward.__get__(net)
    x, t, cond, image = (torch.randn(2, 4) for _ in range(4))
    net(x, t, cond, image, 1.0), net(x, t, cond, image, 1.0)  # eager, then captured
    replays = runner.stats["replays"]
    out = net(x, t, cond, image, 1.0, residual=None)
    assert runner.stats["replays"] == replays + 1 and runner.stats["captures"] == 1  # the same graph
    assert torch.allclose(out[0][0], eager(x, t, cond, image, 1.0)[0][0])
    assert compiler.wait(60) and compiler.ready and compiles == ["compile-controlnet"]
    out = net(x, t, cond, image, 0.7)  # the compiled forward's first call here: no graph yet
    assert runner.stats["compiled_eager"] == 1
    want = eager(x, t, cond, image, 0.7)
    assert torch.allclose(out[0][1], want[0][1]) and torch.allclose(out[1], want[1])
    net(x, t, cond, image, 0.3)  # captured; then replayed at another strength
    out = net(x, t, cond, image, 0.5, residual=None)
    assert torch.allclose(out[0][0], eager(x, t, cond, image, 0.5)[0][0])
    assert compiles == ["compile-controlnet"]  # no strength recompiled anything, on any thread
    torch._dynamo.reset()


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


def test_short_switch_interval_lasts_while_any_compile_runs():
    import sys

    from mcp_sdxl.engine.background_compile import SERVING_SWITCH_INTERVAL_S, _short_switch_interval

    before = sys.getswitchinterval()
    _short_switch_interval.__enter__()  # two compiles overlapping (two engines in one process)
    _short_switch_interval.__enter__()
    _short_switch_interval.__exit__(None, None, None)
    assert abs(sys.getswitchinterval() - SERVING_SWITCH_INTERVAL_S) < 1e-9  # the other one still compiles
    _short_switch_interval.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


@torch.inference_mode()
def test_a_compile_run_out_of_gpu_memory_is_tried_again_then_given_up():
    from mcp_sdxl.engine.background_compile import BackgroundCompiler

    fails = {"left": 1}

    def backend(graph_module, example_inputs):
        def run(*args):
            if fails["left"]:
                fails["left"] -= 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return graph_module.forward(*args)

        return run

    torch._dynamo.reset()
    net = Net()
    compiler = BackgroundCompiler(torch.compile(net.forward, backend=backend, dynamic=False), name="unet")
    x = torch.randn(2, 4)
    leaves: list = []
    structure = cuda_graphs._flatten(((x,), {}), leaves)
    assert compiler.submit("sig", 0, structure, leaves) and compiler.wait(60)
    assert compiler.wanted("sig", 0) and not compiler.ready  # memory may be free next time: not given up
    assert compiler.submit("sig", 0, structure, leaves) and compiler.wait(60)
    assert compiler.ready == {"sig": 0} and compiler.stats["failures"] == 1
    fails["left"] = 2
    torch._dynamo.reset()
    for _ in range(2):  # out of memory twice on one signature: stays on the plain forward
        assert compiler.submit("other", 0, structure, leaves) and compiler.wait(60)
    assert not compiler.wanted("other", 0) and "other" not in compiler.ready
    torch._dynamo.reset()


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
