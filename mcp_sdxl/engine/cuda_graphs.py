"""CUDA graphs for module forwards: capture once per input signature, replay after (the `cuda_graphs` lever).

Eager SDXL is bound by the CPU launching ~2,000 small kernels per UNet step; a replay launches none. A
GraphRunner stands in for a module's forward (UNet, text encoders, each ControlNet, the VAE decode): the
first call of a signature runs eagerly, the second captures, later ones replay. Same kernels, same image.
The memory policy (which graphs to keep, what to give back on out-of-memory) is in accel.py.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


class Uncapturable(Exception):
    pass


def give_back_side_stream_memory() -> None:
    """Return what side-stream work left cached: freed blocks, and cuBLAS's workspaces.

    The caching allocator keeps a freed block for the stream it was allocated on, and cuBLAS keeps one
    workspace (32 MiB on Hopper) per handle and stream for the process's life. Capture warm-ups and
    background compiles run on side streams from torch's pool of 32: with two ControlNets, 0.74 GiB sat
    reserved on other streams of an H200 after a call (docs/bench, session 6). Clearing the workspaces is
    what torch's own CUDA graph trees do around warm-ups and captures; the next matmul on a stream makes
    a new one (a graph captured before keeps the one it recorded: captured in its pool, it stays there).
    """
    if not torch.cuda.is_available():
        return
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        torch.cuda.synchronize()  # no kernel still uses a workspace
        clear()
    torch.cuda.empty_cache()


def _flatten(obj, leaves: list):
    """Structure (hashable) + tensor leaves of call arguments made of tensors, scalars, tuples, lists, dicts."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return "T"
    if isinstance(obj, (tuple, list)):
        if type(obj) not in (tuple, list):
            raise Uncapturable(f"unsupported sequence type {type(obj).__name__}")
        return (type(obj) is tuple, tuple(_flatten(o, leaves) for o in obj))
    if isinstance(obj, dict):  # plain dicts, and model outputs (diffusers BaseOutput, transformers ModelOutput)
        if not all(isinstance(k, str) for k in obj):
            raise Uncapturable("mapping with non-string keys")
        kind = "dict" if type(obj) is dict else type(obj)
        return ("dict", kind, tuple((k, _flatten(v, leaves)) for k, v in obj.items()))
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ("V", type(obj).__name__, obj)
    raise Uncapturable(f"unsupported argument type {type(obj).__name__}")


def _unflatten(structure, leaves):
    if structure == "T":
        return next(leaves)
    if structure[0] == "V":
        return structure[2]
    if structure[0] == "dict":
        values = {k: _unflatten(v, leaves) for k, v in structure[2]}
        return values if structure[1] == "dict" else structure[1](**values)
    items = [_unflatten(s, leaves) for s in structure[1]]
    return tuple(items) if structure[0] is True else items


class CudaGraphBackend:
    """torch.cuda graphs; tests substitute a CPU stand-in with the same four methods."""

    def usable(self, tensors) -> bool:
        return all(t.is_cuda for t in tensors) and not torch.cuda.is_current_stream_capturing()

    def warm_up(self, fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        # the warm-up's activations were freed on a side stream: cached for that stream only, they would sit
        # reserved beside the pool while the capture fills it (graph pools are not touched by empty_cache)
        give_back_side_stream_memory()

    def capture(self, fn, pool):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
        give_back_side_stream_memory()
        return graph, out, graph.pool()

    def replay(self, graph) -> None:
        graph.replay()

    def reserved(self) -> int:
        return torch.cuda.memory_reserved()


@dataclass
class _Entry:
    graph: Any
    inputs: list  # static input tensors, in leaf order
    output: Any
    out_structure: Any
    out_leaves: list


class GraphRunner:
    """Stands in for a module's forward: eager on a signature's first call, then one captured graph per signature.

    A signature is the argument structure plus each tensor's shape, dtype and strides (scalars by value).
    Replays copy the arguments into the graph's static inputs and return copies of its outputs. The weights'
    addresses are checked before every replay (moved weights: graphs dropped); `lora_wrappers.lora_update`
    makes the runner re-scan the module. With `scale_arg` (ControlNet's conditioning_scale) the graph runs at scale 1.0 and
    the outputs are multiplied by the scale, so every strength shares one graph.
    """

    def __init__(self, module, fn: Callable, state, *, name: str, scale_arg=None,
                 max_graphs: int = 8, backend=None, compiler=None, capture_plain: bool = True):
        self._module = weakref.ref(module)
        self.fn = fn
        self.state = state
        self.name = name
        self.scale_arg = scale_arg
        self.max_graphs = max_graphs
        self.backend = backend or CudaGraphBackend()
        self.compiler = compiler  # BackgroundCompiler (compile: full): `fn` compiled off the caller's thread
        # capture_plain=False (with a compiler): the plain forward runs eagerly until its compile is done (or
        # failed) and only the compiled one is captured. For the VAE decode, whose plain capture would size
        # the shared pool by eager's bigger working set for good (pools never shrink while a graph lives).
        self.capture_plain = capture_plain or compiler is None
        self.enabled = True
        self.entries: dict = {}
        self.seen: dict = {}
        self.failed: set = set()
        self.stats = {"eager": 0, "captures": 0, "replays": 0, "resets": 0, "capture_s": 0.0}
        self._version = None
        self._tensors: list = []
        self._ptrs: list = []
        self._lora_active = False
        self._none_defaults = _none_defaults(fn)
        functools.update_wrapper(self, fn, updated=())

    # -- bookkeeping
    def reset(self) -> None:
        if self.entries:
            self.stats["resets"] += 1
        self.entries.clear()
        self.seen.clear()
        self._ptrs = []
        if not any(r.entries for r in self.state.runners):
            # a pool whose graphs are all gone cannot be handed to a new capture: start a fresh one
            self.state.pool[0] = None

    def _rescan(self, module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        from mcp_sdxl.engine.lora_wrappers import is_identity_lora

        tensors = [p for n, p in module.named_parameters() if "lora_" not in n]
        tensors += [b for n, b in module.named_buffers() if "lora_" not in n]
        self._tensors = tensors
        # an active, unfused adapter computes something a graph captured without it lacks (and vice versa)
        self._lora_active = any(isinstance(m, BaseTunerLayer) and not is_identity_lora(m) for m in module.modules())
        self._version = self.state.version

    def _weights_moved(self, module) -> bool:
        if self._version != self.state.version:
            before = (self._lora_active, [id(t) for t in self._tensors])
            self._rescan(module)
            if before != (self._lora_active, [id(t) for t in self._tensors]):
                self.reset()
        ptrs = [t.data_ptr() for t in self._tensors]
        if ptrs != self._ptrs:
            if self._ptrs:
                self.reset()
            self._ptrs = ptrs
            return True
        return False

    # -- the call
    def __call__(self, *args, **kwargs):
        module = self._module()
        if not self.enabled or module is None or torch.is_grad_enabled():
            return self.fn(*args, **kwargs)
        scale = None
        # an explicit None where the default is None is the same call: one signature (a ControlNet pipeline
        # outside the ControlNet's window passes residuals=None, the base pipeline passes nothing)
        call_args = args
        call_kwargs = {k: v for k, v in kwargs.items() if not (v is None and k in self._none_defaults)}
        if self.scale_arg is not None:
            call_args, call_kwargs, scale = self._unit_scale(call_args, call_kwargs)
            if scale is None:
                return self.fn(*args, **kwargs)
        unit = (call_args, call_kwargs, scale)
        leaves: list = []
        try:
            structure = _flatten((call_args, call_kwargs), leaves)
        except Uncapturable:
            return self.fn(*args, **kwargs)
        if not self.backend.usable(leaves):
            return self.fn(*args, **kwargs)
        signature = (structure, torch.is_inference_mode_enabled(),
                     tuple((tuple(t.shape), t.dtype, t.stride(), t.device) for t in leaves))
        self._weights_moved(module)
        fn = self.fn
        if self.compiler is not None and (signature, True) in self.entries:
            # its graph replays the current weights (the entries go when the tensors change): a LoRA switch
            # keeps the compiled graph without a new compile
            fn = self.compiler.compiled
        elif self.compiler is not None:
            fn = self.compiler.function_for(signature, self.state.version, self.fn)
            if fn is self.fn and self.compiler.wanted(signature, self.state.version) and (
                    (signature, False) in self.entries or (signature, False) in self.failed
                    or self.state.captures_off or not self.capture_plain) and not _compiling(self.state):
                # serving fast already (or never will by graphs): compile this signature in the background;
                # one compile at a time in a pipeline (dynamo's compiles are not meant to run concurrently)
                self.compiler.submit(signature, self.state.version, structure, leaves)
        if fn is not self.fn and (signature, True) not in self.entries and _compiling(self.state):
            # dynamo refuses a compiled call while another thread traces (a process-wide FX flag): until the
            # compile is done, a compiled forward without its graph yet runs as the plain one
            fn = self.fn
        key = (signature, fn is not self.fn)  # graphs of the plain and of the compiled forward
        if key in self.failed:
            return self._plain(fn, args, kwargs, unit)
        entry = self.entries.get(key)
        if entry is None:
            seen = self.seen[key] = self.seen.get(key, 0) + 1
            waiting_for_compile = (fn is self.fn and not self.capture_plain
                                   and self.compiler.wanted(signature, self.state.version))
            if seen < 2 or len(self.entries) >= self.max_graphs or self.state.captures_off or _compiling(self.state) \
                    or waiting_for_compile:
                self.stats["eager"] += 1
                return self._plain(fn, args, kwargs, unit)
            entry = self._capture(key, structure, leaves, fn)
            if entry is None:
                return self._plain(fn, args, kwargs, unit)
            self.entries.pop((signature, not key[1]), None)  # the other forward's graph of this signature goes
        for static, value in zip(entry.inputs, leaves):
            static.copy_(value)
        self.backend.replay(entry.graph)
        self.stats["replays"] += 1
        if scale is None:
            return _unflatten(entry.out_structure, iter([t.clone() for t in entry.out_leaves]))
        return _unflatten(entry.out_structure, iter([t * scale for t in entry.out_leaves]))

    def _unit_scale(self, args, kwargs):
        index, name = self.scale_arg
        if len(args) > index:
            scale = args[index]
            args = args[:index] + (1.0,) + args[index + 1 :]
        elif name in kwargs:
            scale = kwargs[name]
            kwargs = {**kwargs, name: 1.0}
        else:
            scale = 1.0
        if kwargs.get("guess_mode"):
            return args, kwargs, None
        return args, kwargs, (float(scale) if isinstance(scale, (int, float)) else None)

    def _plain(self, fn, args, kwargs, unit):
        """A call without a graph. The plain forward takes the call's own arguments; the compiled one the
        arguments it was compiled for (`unit`: scale 1.0, the scale applied after, as for graphs): another
        strength would be a new constant to dynamo, a recompile on the caller's thread (56 s on an H200)."""
        if fn is self.fn:
            return fn(*args, **kwargs)
        self.stats["compiled_eager"] = self.stats.get("compiled_eager", 0) + 1
        call_args, call_kwargs, scale = unit
        out = fn(*call_args, **call_kwargs)
        if scale is None:
            return out
        leaves: list = []
        structure = _flatten(out, leaves)
        return _unflatten(structure, iter([t * scale for t in leaves]))

    def _capture(self, key, structure, leaves, fn):
        started = time.perf_counter()
        inputs = [torch.empty_like(t) for t in leaves]
        for static, value in zip(inputs, leaves):
            static.copy_(value)
        args, kwargs = _unflatten(structure, iter(inputs))
        reserved = getattr(self.backend, "reserved", None)
        before = reserved() if reserved is not None else 0
        try:
            self.backend.warm_up(lambda: fn(*args, **kwargs))
            graph, out, pool = self.backend.capture(lambda: fn(*args, **kwargs), self.state.pool[0])
            out_leaves: list = []
            out_structure = _flatten(out, out_leaves)
        except Exception as exc:  # an op that cannot be captured: this signature stays eager
            log.warning("%s: CUDA graph capture failed, running eagerly: %s: %s", self.name, type(exc).__name__, exc)
            self.failed.add(key)
            return None
        if self.state.pool[0] is None:
            self.state.pool[0] = pool
        entry = _Entry(graph, inputs, out, out_structure, out_leaves)
        self.entries[key] = entry
        self.stats["captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - started
        if reserved is not None:  # what each capture added to reserved memory (its pool, its static inputs)
            grown = self.stats.setdefault("capture_reserved_gib", [])
            if len(grown) < 16:
                grown.append(round((reserved() - before) / 2**30, 3))
        return entry


def _none_defaults(fn) -> frozenset:
    """Names of `fn`'s parameters whose default is None."""
    import inspect

    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(p.name for p in parameters if p.default is None)


def _compiling(state) -> bool:
    """A background compile is running somewhere in this pipeline (no captures meanwhile)."""
    return any(r.compiler is not None and r.compiler.busy for r in state.runners)


def install_graphs(state, module, fn: Callable, *, name: str, scale_arg=None, backend=None,
                   attr: str = "forward", compiler=None, capture_plain: bool = True) -> GraphRunner:
    runner = GraphRunner(module, fn, state, name=name, scale_arg=scale_arg, backend=backend, compiler=compiler,
                         capture_plain=capture_plain)
    setattr(module, attr, runner)
    state.runners.append(runner)
    return runner


def graph_stats(pipe) -> dict:
    state = getattr(pipe, "_mcp_accel", None)  # accel.STATE_ATTR
    stats = {}
    for runner in state.runners if state else []:
        stats[runner.name] = dict(runner.stats)
        if runner.compiler is not None:
            stats[runner.name]["background_compile"] = dict(runner.compiler.stats, busy=runner.compiler.busy,
                                                            ready=len(runner.compiler.ready))
    return stats
