"""The background compile (compile: full, mcp_sdxl/engine/background_compile.py) with the GraphRunner, on
the CPU: a real torch.compile whose backend records the thread it runs on (and takes its time, or fails),
so the tests see what a multi-minute SDXL compile would do to the calls served meanwhile."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import torch

from mcp_sdxl.engine import accel, cuda_graphs
from mcp_sdxl.engine.background_compile import SERVING_SWITCH_INTERVAL_S, BackgroundCompiler, _short_switch_interval
from tests.engine.graph_helpers import CpuGraphs, FakePipe, Net, tiny_engine


def _recording_backend(threads: list, then=None):
    """A torch.compile backend that records the thread each compile runs on (then waits, if asked) and
    returns the traced graph unchanged."""
    def backend(graph_module, example_inputs):
        threads.append(threading.current_thread().name)
        if then is not None:
            then()
        return graph_module.forward

    return backend


def _compiled_runner(state, net, backend, name: str, **kwargs):
    """`net` under a GraphRunner (CPU graphs) whose BackgroundCompiler compiles with `backend`."""
    compiler = BackgroundCompiler(torch.compile(net.forward, backend=backend, dynamic=False), name=name)
    runner = accel.install_graphs(state, net, net.forward, name=name, backend=CpuGraphs(), compiler=compiler, **kwargs)
    return compiler, runner


def test_full_compile_runs_in_the_background_and_never_blocks_a_call(tmp_path, tiny_cache):
    """compile: full on the real tiny pipeline, its UNet under a GraphRunner with a BackgroundCompiler.
    The compile backend is a real torch.compile backend that records its thread and takes its time (the
    full SDXL compile takes minutes): images keep coming at the plain forward's speed meanwhile, nothing
    compiles on the caller's thread, and once compiled the UNet runs the compiled graph, same image."""
    engine, request, want = tiny_engine(tmp_path, tiny_cache)

    compiled_on, delay = [], 4.0
    slow_backend = _recording_backend(compiled_on, then=lambda: time.sleep(delay))

    torch._dynamo.reset()
    unet = engine.pipe.unet
    compiler, runner = _compiled_runner(accel.state_of(engine.pipe), unet, slow_backend, "unet")
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
    gate = threading.Event()
    compiled_names = []
    gated_backend = _recording_backend(compiled_names, then=lambda: gate.wait(60))

    torch._dynamo.reset()
    pipe = FakePipe()
    state = accel.state_of(pipe)
    nets, compilers, runners = [], [], []
    for name in ("unet", "controlnet1"):
        net = Net()
        compiler, runner = _compiled_runner(state, net, gated_backend, name)
        runners.append(runner)
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
    threads = []
    backend = _recording_backend(threads)

    torch._dynamo.reset()
    pipe, net = FakePipe(), Net()
    state = accel.state_of(pipe)
    compiler, runner = _compiled_runner(state, net, backend, "unet")
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
    compiles = []
    backend = _recording_backend(compiles)

    torch._dynamo.reset()
    pipe, net = FakePipe(), ScaledNet()
    state = accel.state_of(pipe)
    compiler, runner = _compiled_runner(state, net, backend, "controlnet", scale_arg=(4, "conditioning_scale"))
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


def test_short_switch_interval_lasts_while_any_compile_runs():
    before = sys.getswitchinterval()
    _short_switch_interval.__enter__()  # two compiles overlapping (two engines in one process)
    _short_switch_interval.__enter__()
    _short_switch_interval.__exit__(None, None, None)
    assert abs(sys.getswitchinterval() - SERVING_SWITCH_INTERVAL_S) < 1e-9  # the other one still compiles
    _short_switch_interval.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


@torch.inference_mode()
def test_a_compile_run_out_of_gpu_memory_is_tried_again_then_given_up():
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




def _compile_held_at_a_gate():
    """A Net under a GraphRunner whose background compile has started and waits until `gate` is set."""
    gate = threading.Event()
    torch._dynamo.reset()
    pipe, net = FakePipe(), Net()
    compiler, runner = _compiled_runner(accel.state_of(pipe), net, _recording_backend([], then=lambda: gate.wait(60)),
                                        "unet")
    x = torch.randn(2, 4)
    net(x), net(x), net(x)  # eager, captured, then a replay that hands the signature to the compiler
    assert compiler.busy
    return gate, pipe, net, compiler, runner, x


@torch.inference_mode()
def test_out_of_memory_while_a_compile_runs_waits_for_it_and_keeps_capturing():
    """The compile's own forward pass holds memory beside the call's: an out-of-memory error then waits
    for the compile to end (the call is worth another try) without turning CUDA graphs off."""
    gate, pipe, net, compiler, runner, x = _compile_held_at_a_gate()
    state = accel.state_of(pipe)
    threading.Timer(0.5, gate.set).start()
    started = time.perf_counter()
    assert accel.after_oom(pipe) is True
    assert time.perf_counter() - started >= 0.4 and not compiler.busy and compiler.ready
    assert state.one_family and not state.captures_off and not runner.entries
    out = net(x), net(x)
    assert runner.entries  # graphs are captured again (now of the compiled forward)
    assert torch.allclose(out[1]["y"], Net.forward.__get__(net)(x)["y"])
    torch._dynamo.reset()


@torch.inference_mode()
def test_a_cancelled_call_stops_waiting_for_the_compile():
    gate, pipe, net, compiler, _, x = _compile_held_at_a_gate()
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.perf_counter()
    accel.after_oom(pipe, cancelled=cancel.is_set)
    assert time.perf_counter() - started < 2.0 and compiler.busy  # the compile goes on without the call
    gate.set()
    assert compiler.wait(60) and compiler.ready
    torch._dynamo.reset()


def test_a_lora_change_leaves_the_compiled_unet_as_it_was(tmp_path, tiny_cache):
    """torch.compile guards on each parameter's requires_grad and inductor's cache keys it. diffusers loads
    weights with requires_grad=True and peft turned it off for every layer it wraps, so the first LoRA made
    the UNet another graph: a recompile (146.7 s under the VRAM cap on an H200, where the cached compile
    took 24 s). The engine keeps every parameter at requires_grad=False."""
    from mcp_sdxl.engine import LoraSpec

    engine, request, _ = tiny_engine(tmp_path, tiny_cache)
    accel.state_of(engine.pipe).strip_lora = True  # as on CUDA: the fused LoRA's wrappers leave the model
    unet = engine.pipe.unet
    calls = []
    plain = unet.forward
    unet.forward = lambda *a, **k: (calls.append((a, k)), plain(*a, **k))[1]
    engine.generate(request)
    unet.forward = plain
    args, kwargs = calls[0]
    compiles: list = []
    torch._dynamo.reset()
    compiled = torch.compile(plain, backend=_recording_backend(compiles), dynamic=False)
    with torch.inference_mode():
        compiled(*args, **kwargs)
        assert len(compiles) == 1
        engine.loras.apply([LoraSpec("character:luca", engine.lora_file("character", "luca"), 0.8)])
        compiled(*args, **kwargs)
        engine.loras.apply([])
        compiled(*args, **kwargs)
    assert len(compiles) == 1  # the same graph throughout
    assert not any(p.requires_grad for p in unet.parameters())
    torch._dynamo.reset()


def test_lora_calls_leave_the_module_tree_alone_while_a_compile_traces_it(tmp_path, tiny_cache):
    """A background compile builds its guards from the live module tree when it ends. The same LoRAs again
    (most calls) no longer swap peft's wrappers in and out; a real change waits for the compile first
    (on an H200 a swap mid-compile broke it: "'Linear' object has no attribute 'merged_adapters'")."""
    from mcp_sdxl.engine import LoraSpec

    engine, request, _ = tiny_engine(tmp_path, tiny_cache)
    state = accel.state_of(engine.pipe)
    state.strip_lora = True  # as on CUDA (the engine guards its LoraManager: lora_wrappers.guard_lora_manager)
    luca = [LoraSpec("character:luca", engine.lora_file("character", "luca"), 0.8)]
    engine.loras.apply(luca)

    def tree():
        return [id(m) for m in engine.pipe.unet.modules()]

    before = tree()
    with torch.inference_mode():
        gate, _, _, compiler, runner, _ = _compile_held_at_a_gate()
    state.runners.append(runner)  # this pipeline now has a compile running
    try:
        engine.loras.apply(luca)  # the same LoRAs: returns at once, nothing swapped
        assert tree() == before and compiler.busy
        switch = threading.Thread(target=engine.loras.apply, args=([],))
        switch.start()
        switch.join(0.5)
        assert switch.is_alive() and tree() == before  # a real change waits for the compile
        gate.set()
        switch.join(60)
        assert not switch.is_alive() and engine.loras.active == ()
    finally:
        gate.set()
        state.runners.remove(runner)
        torch._dynamo.reset()


@torch.inference_mode()
def test_side_stream_memory_goes_back_at_the_next_call_once_no_compile_runs(monkeypatch):
    """A finished background compile leaves a cuBLAS workspace on its side stream (32 MiB each on Hopper;
    0.74 GiB sat on other streams with two ControlNets). Clearing it from the compile thread would race
    the serving thread's matmuls, so the next call's start gives it back, and only while nothing compiles."""
    gate = threading.Event()
    given_back = []
    monkeypatch.setattr(accel, "give_back_side_stream_memory", lambda: given_back.append(True))
    torch._dynamo.reset()
    pipe = FakePipe()
    state = accel.state_of(pipe)
    net = Net()
    compiler, runner = _compiled_runner(state, net, _recording_backend([], then=lambda: gate.wait(60)), "unet")
    x = torch.randn(2, 4)
    net(x), net(x), net(x)  # eager, captured, then the replay that starts the compile
    assert compiler.busy
    compiler.side_memory_left = True  # set by a CUDA run when it ends
    accel.begin_call(pipe, "base")
    assert given_back == []  # a compile runs: nothing is cleared under it
    gate.set()
    assert compiler.wait(60)
    compiler.side_memory_left = True
    accel.begin_call(pipe, "base")
    accel.begin_call(pipe, "base")
    assert given_back == [True] and not compiler.side_memory_left  # once, at the first call after it
    torch._dynamo.reset()


@torch.inference_mode()
def test_a_runner_that_captures_only_compiled_runs_eagerly_until_its_compile_is_done():
    """The VAE decode's runner (capture_plain=False): its plain forward would size the shared graph pool
    by eager's working set for good, so it runs eagerly (no capture) and hands its signature to the
    compiler at once; the compiled forward is what gets captured. If the compile fails, the plain
    forward is captured after all."""
    gate = threading.Event()
    compiled_names: list = []
    torch._dynamo.reset()
    pipe, net = FakePipe(), Net()
    compiler, runner = _compiled_runner(accel.state_of(pipe), net,
                                        _recording_backend(compiled_names, then=lambda: gate.wait(60)),
                                        "vae_decode", capture_plain=False)
    x = torch.randn(2, 4)
    want = Net.forward.__get__(net)(x)["y"]
    assert torch.allclose(net(x)["y"], want)  # the first call submits: no plain graph needed first
    assert compiler.busy
    for _ in range(3):
        assert torch.allclose(net(x)["y"], want)
    assert runner.stats["captures"] == 0 and runner.stats["eager"] == 4  # eager while it compiles
    gate.set()
    assert compiler.wait(60) and compiler.ready
    net(x), net(x)  # the compiled forward: one eager run, then its capture
    assert runner.stats["captures"] == 1 and all(key[1] for key in runner.entries)  # only compiled graphs
    assert torch.allclose(net(x)["y"], want) and runner.stats["replays"] >= 1

    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("inductor cannot compile this")

    torch._dynamo.reset()
    other = Net()
    compiler, runner = _compiled_runner(accel.state_of(FakePipe()), other, failing_backend, "vae_decode",
                                        capture_plain=False)
    suppress = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = False  # the failure reaches the compiler (on CUDA it runs eagerly)
    try:
        other(x)
        assert compiler.wait(60) and compiler.failed  # given up: this signature stays on the plain forward
        other(x), other(x)
    finally:
        torch._dynamo.config.suppress_errors = suppress
    assert runner.stats["captures"] == 1 and not any(key[1] for key in runner.entries)  # the plain graph
    torch._dynamo.reset()
