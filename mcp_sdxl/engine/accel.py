"""Speed levers for CUDA, applied when the engine loads its pipeline (measured: docs/bench/, issue 8).

- channels_last: NHWC layout for the UNet's and ControlNets' convolutions (cuDNN's fast path on tensor cores).
- fuse_qkv: one matrix product for each self-attention's Q, K and V (K and V for cross-attention). LoRAs
  target the separate to_q / to_k / to_v layers, so after every LoRA change the fused weights are refreshed
  from them (`lora_update`): fused QKV never hides a LoRA.
- cuda_graphs: the UNet's (and each ControlNet's, the text encoders', the VAE decode's) forward is captured
  once per input signature and replayed (mcp_sdxl/engine/cuda_graphs.py). Weights that move (offload,
  reload) or change shape invalidate the graphs; LoRAs fused in place do not. Which graphs are kept is the
  memory policy here: every kind of call's by default, one kind's under a VRAM cap or after an
  out-of-memory error (begin_call, after_oom).
- compile: "regional" compiles the repeated transformer blocks of the UNet and of each ControlNet (a short
  first-call compile; the ControlNets' blocks reuse the UNet's compiled code), "full" (the default) the
  whole UNet and ControlNet forwards (20-120 s per kind of call: with cuda_graphs it compiles in a
  background thread, engine/background_compile.py, and no call waits for it). The inductor and Triton
  caches live under the data home (`compile_cache_dir`), so later starts reuse the compiled code. With
  `compile_vae_decode` the VAE decode is compiled too (its eager capture set the graphs' pool at 2.97 GiB,
  compiled 1.43 GiB; 30 ms faster), and only its compiled forward is captured.
- vae_dtype: the SDXL VAE's config asks for a float32 decode (it overflows in float16); "bfloat16" decodes in
  bf16 (float32's range), "float16" suits the fp16-fix VAE only.
- strip_lora_wrappers: after the active LoRAs are fused, peft's wrapper layers compute nothing but their base
  layer; they are swapped out of the model while it runs and put back for the next LoRA change
  (engine/lora_wrappers.py, with the fused-QKV refresh every LoRA change needs).

The engine calls: `optimize_pipeline` after loading, `optimize_controlnet` for each ControlNet it loads,
`lora_wrappers.guard_lora_manager` once (every LoRA change then runs inside `lora_update`), and `release`
before it moves weights off the GPU. On the CPU (tiny engine, tests) nothing changes: no lever is applied and `lora_update`
only re-attaches what it never stripped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mcp_sdxl.engine.background_compile import BackgroundCompiler
from mcp_sdxl.engine.cuda_graphs import (  # noqa: F401 (re-exported)
    GraphRunner,
    _compiling,
    give_back_side_stream_memory,
    graph_stats,
    install_graphs,
)

log = logging.getLogger(__name__)

STATE_ATTR = "_mcp_accel"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class AccelState:
    """What the levers installed on one pipeline (kept on the pipeline as `_mcp_accel`)."""

    performance: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    runners: list = field(default_factory=list)  # GraphRunner, UNet first
    stripped: list = field(default_factory=list)  # (parent module, child name, peft wrapper)
    pool: list = field(default_factory=lambda: [None])  # one CUDA graph memory pool shared by all runners
    version: int = 0  # bumped by every lora_update (runners re-check what they captured)
    fused_qkv: bool = False
    strip_lora: bool = False  # set on CUDA when performance.strip_lora_wrappers
    # Memory policy for graphs (see begin_call / after_oom): under a VRAM cap, or after an out-of-memory
    # error, only the graphs of one kind of call are kept; a kind that runs out of memory with its own
    # graphs alone runs without graphs from then on (other kinds keep theirs).
    one_family: bool = False
    family: Any = None  # the kind of call (size, ControlNets, CFG) the graphs held now belong to
    graphless: set = field(default_factory=set)  # kinds of call that capture no graphs
    zero_residuals: dict = field(default_factory=dict)  # the UNet's zero ControlNet residuals, per shape
    applied: dict = field(default_factory=dict)  # lever -> what was done (for status / the benchmark)

    @property
    def captures_off(self) -> bool:
        """The current kind of call captures no new graphs."""
        return self.family in self.graphless


def set_expandable_segments(on: bool) -> bool:
    """Switch the CUDA allocator's expandable segments for the memory it maps from now on; False when
    PYTORCH_CUDA_ALLOC_CONF already says (the user's setting wins) or this torch cannot."""
    if "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return False
    # private torch APIs: the accelerator one since torch 2.9 (the CUDA one warns it is deprecated there)
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    try:
        setter(f"expandable_segments:{on}")
    except Exception as exc:  # an older or newer torch may lack both
        log.warning("expandable_segments not applied: %s", exc)
        return False
    return True


def state_of(pipe) -> AccelState:
    state = getattr(pipe, STATE_ATTR, None)
    if state is None:
        state = AccelState()
        setattr(pipe, STATE_ATTR, state)
    return state


# ---------------------------------------------------------------------------------------------- entry points
def optimize_pipeline(pipe, performance, device: torch.device, cache_root: Path | None = None,
                      one_family: bool = False) -> AccelState:
    """Apply the configured levers to a freshly loaded pipeline. On the CPU nothing changes."""
    state = state_of(pipe)
    state.performance, state.device = performance, torch.device(device)
    state.one_family = one_family  # tight memory: keep the CUDA graphs of one kind of call only
    if state.device.type != "cuda":
        return state
    applied = state.applied
    if getattr(performance, "expandable_segments", False) and set_expandable_segments(True):
        applied["expandable_segments"] = True
    # The engine loads on the CPU and then moves the pipeline; layout changes and fusions are much
    # faster on the GPU (10.8 s -> ~3 s for SDXL), so move first (the engine's own move is then a no-op).
    pipe.to(state.device)
    unet = pipe.unet
    state.strip_lora = bool(getattr(performance, "strip_lora_wrappers", False))
    if getattr(performance, "cudnn_benchmark", False):
        torch.backends.cudnn.benchmark = True
        applied["cudnn_benchmark"] = True
    if performance.channels_last:
        unet.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    if performance.fuse_qkv:
        unet.fuse_qkv_projections()
        state.fused_qkv = True
        applied["fuse_qkv"] = True
    vae_dtype = getattr(performance, "vae_dtype", "auto")
    if vae_dtype != "auto":
        set_vae_dtype(pipe.vae, DTYPES[vae_dtype])
        applied["vae_dtype"] = vae_dtype
    compiler = None
    mode = performance.compile
    graphs = getattr(performance, "cuda_graphs", False)
    if mode != "off":
        configure_compile_cache(_cache_dir(performance, cache_root))
        import torch._dynamo as dynamo

        # a compile failure must not fail a generation: dynamo then runs that frame eagerly
        dynamo.config.suppress_errors = True
        if mode == "regional":
            unet.compile_repeated_blocks(dynamic=False)
        elif graphs:  # full, with graphs: compiled in the background while the plain forward serves
            compiler = BackgroundCompiler(torch.compile(unet.forward, dynamic=False), name="unet")
        else:  # full, without graphs: compiled on the first call of each signature (minutes, blocking)
            unet.forward = torch.compile(unet.forward, dynamic=False)
        applied["compile"] = mode
    if graphs:
        install_graphs(state, unet, unet.forward, name="unet", compiler=compiler)
        # compel runs each text encoder twice per image (prompt, negative): ~0.2 s of launches, eager
        for component in ("text_encoder", "text_encoder_2"):
            model = getattr(pipe, component, None)
            if model is not None:
                install_graphs(state, model, model.forward, name=component)
        # the decode is GPU-bound; in the shared pool its activations reuse the UNet's memory (-1-2 GiB peak)
        decode_compiler = None
        if compiler is not None and getattr(performance, "compile_vae_decode", False):
            decode_compiler = BackgroundCompiler(torch.compile(pipe.vae.decode, dynamic=False), name="vae_decode")
        install_graphs(state, pipe.vae, pipe.vae.decode, name="vae_decode", attr="decode", compiler=decode_compiler,
                       capture_plain=decode_compiler is None)
        applied["cuda_graphs"] = True
    if graphs or mode == "full":
        unet.forward = with_zero_residuals(unet, unet.forward, state.zero_residuals)
        applied["one_unet_signature"] = True
    return state


def residual_shapes(unet, sample_shape) -> tuple[list[tuple], tuple]:
    """Shapes of the ControlNet residuals this UNet adds for a latent of `sample_shape` (N, C, H, W): one per
    down-block output (conv_in, each resnet, each downsampler) and one for the mid block."""
    config = unet.config
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    n, _, h, w = sample_shape
    shapes = [(n, channels[0], h, w)]
    for i, (c, count) in enumerate(zip(channels, layers)):
        shapes += [(n, c, h, w)] * count
        if i < len(channels) - 1:  # a 3x3 stride-2 convolution, padding 1
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((n, c, h, w))
    return shapes, (n, channels[-1], h, w)


def with_zero_residuals(unet, forward, zeros: dict):
    """The UNet's forward, always called with ControlNet residuals: zeros when there is no ControlNet.

    A base call and a ControlNet call are then one input signature, so one compiled graph serves both
    (measured on an H200: the ControlNet signature was a second full UNet compile, 118 s with nothing
    cached, and under a 15.5 GiB cap two ControlNets ran at 39 s per image while it compiled beside them).
    Adding zeros leaves every value as it was (x + 0 == x); the zeros are made once per shape (107 MB at
    1024x1024 with CFG), kept in `zeros` (AccelState.zero_residuals: `release` drops them with the weights).
    Residuals keep the UNet's memory format, so both calls have the same strides."""

    def fill(sample, *args, down_block_additional_residuals=None, mid_block_additional_residual=None, **kwargs):
        if not isinstance(sample, torch.Tensor) or kwargs.get("down_intrablock_additional_residuals") is not None:
            return forward(sample, *args, down_block_additional_residuals=down_block_additional_residuals,
                           mid_block_additional_residual=mid_block_additional_residual, **kwargs)
        fmt = torch.channels_last if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) \
            and not unet.conv_in.weight.is_contiguous() else torch.contiguous_format
        if down_block_additional_residuals is None or mid_block_additional_residual is None:
            key = (tuple(sample.shape), sample.dtype, sample.device, fmt)
            if key not in zeros:
                down_shapes, mid_shape = residual_shapes(unet, sample.shape)
                make = functools.partial(torch.zeros, dtype=sample.dtype, device=sample.device)
                zeros[key] = ([make(s).contiguous(memory_format=fmt) for s in down_shapes],
                              make(mid_shape).contiguous(memory_format=fmt))
            down_block_additional_residuals, mid_block_additional_residual = zeros[key]
        down = tuple(r.contiguous(memory_format=fmt) for r in down_block_additional_residuals)
        mid = mid_block_additional_residual.contiguous(memory_format=fmt)
        return forward(sample, *args, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                       **kwargs)

    functools.update_wrapper(fill, forward, updated=())  # name, doc, signature (inspect follows __wrapped__)
    return fill


def optimize_controlnet(pipe, model: torch.nn.Module, performance, device: torch.device) -> None:
    """Levers for a ControlNet the engine has just put on the device."""
    if torch.device(device).type != "cuda":
        return
    if performance.channels_last:
        model.to(memory_format=torch.channels_last)
    if performance.compile == "regional" and not getattr(model, "_mcp_compiled", False):
        # the ControlNet's transformer blocks have the UNet's shapes: dynamo reuses the UNet's compiled code
        blocks = [m for m in model.modules() if m.__class__.__name__ in getattr(pipe.unet, "_repeated_blocks", ())]
        for block in blocks:
            block.compile(dynamic=False)
        model._mcp_compiled = True
    if getattr(performance, "cuda_graphs", False) and not isinstance(getattr(model, "forward", None), GraphRunner):
        name = f"controlnet{len(state_of(pipe).runners)}"
        compiler = None
        if performance.compile == "full":  # like the UNet: compiled in the background, graphs serve meanwhile
            compiler = BackgroundCompiler(torch.compile(model.forward, dynamic=False), name=name)
        # conditioning_scale only multiplies the outputs: the graph runs at 1.0, the scale is applied after it,
        # so one graph serves every strength.
        install_graphs(state_of(pipe), model, model.forward, name=name, scale_arg=(4, "conditioning_scale"),
                       compiler=compiler)


def release(pipe, moving_weights: bool = True) -> None:
    """Drop every captured CUDA graph (and its memory pool): call before moving weights off the GPU.
    Then a background compile still running (compile: full) finishes first: it runs on these weights.
    Only dropping graphs (another kind of call under a VRAM cap, an out-of-memory retry) does not wait."""
    state = getattr(pipe, STATE_ATTR, None) if pipe is not None else None
    if state is None:
        return
    if moving_weights:
        wait_for_compiles(pipe)
        state.zero_residuals.clear()
    for runner in state.runners:
        runner.reset()
    state.pool[0] = None


def wait_for_compiles(pipe, timeout: float | None = None, cancelled=None) -> float:
    """Wait for background compiles (compile: full) to finish; returns the seconds waited (0.0: none ran).
    With `cancelled`, waits in slices of a second and stops once it returns true."""
    state = getattr(pipe, STATE_ATTR, None) if pipe is not None else None
    busy = [r.compiler for r in (state.runners if state else []) if r.compiler is not None and r.compiler.busy]
    started = time.perf_counter()
    for compiler in busy:
        while compiler.busy:
            left = None if timeout is None else timeout - (time.perf_counter() - started)
            if (left is not None and left <= 0) or (cancelled is not None and cancelled()):
                break
            compiler.wait(left if cancelled is None else min(1.0, left if left is not None else 1.0))
    if busy:
        log.info("waited %.1f s for the background compile of %s", time.perf_counter() - started,
                 ", ".join(c.name for c in busy))
    return time.perf_counter() - started if busy else 0.0


def compiling(pipe) -> bool:
    """A background compile (compile: full) is running in this pipeline."""
    state = getattr(pipe, STATE_ATTR, None) if pipe is not None else None
    return state is not None and _compiling(state)


def holds_graphs(pipe) -> bool:
    state = getattr(pipe, STATE_ATTR, None) if pipe is not None else None
    return state is not None and any(r.entries for r in state.runners)


def begin_call(pipe, family) -> None:
    """Called before each generation with its kind of call (anything hashable: size, ControlNets, CFG).

    Graphs of every kind seen are kept by default (each kind replays at once). Under `one_family` (a VRAM
    cap, or after an out-of-memory error) the graphs of another kind are dropped first, so their memory
    pool never adds to this call's peak; the new kind's graphs are captured on its first steps.
    """
    state = getattr(pipe, STATE_ATTR, None)
    if state is None or not state.runners:
        return
    compilers = [r.compiler for r in state.runners if r.compiler is not None]
    if any(c.side_memory_left for c in compilers) and not _compiling(state):
        give_back_side_stream_memory()  # on the serving thread, between calls: no matmul in flight
        for compiler in compilers:
            compiler.side_memory_left = False
    if state.one_family and state.family is not None and family != state.family and holds_graphs(pipe):
        release(pipe, moving_weights=False)
        _empty_cuda_cache()
    state.family = family


def after_oom(pipe, compile_wait_s: float = 600.0, cancelled=None) -> bool:
    """The GPU ran out of memory: give back what we hold beyond the weights. True when something was given
    back (the call is worth one more try).

    A background compile (compile: full) runs its own forward pass beside the call's, so while one runs the
    call waits for it to end (its activations go with it) and the graph policy stays: measured under a
    15.5 GiB cap (H200, docs/bench/), two ControlNets ran out of memory just as the UNet's compile ended,
    and the plain retry failed too. Otherwise: the first time, graphs of other kinds of call go and one
    kind is kept from then on; when it strikes again with one kind only, that kind captures no graphs
    from then on (measured: 2 ControlNets under the cap then ran at 2.6-3.2 s, and the base image, whose
    graphs fit, fell from 1.11 to 1.35 s while this was one switch for every kind)."""
    state = getattr(pipe, STATE_ATTR, None) if pipe is not None else None
    if state is None:
        return False
    if _compiling(state):
        waited = wait_for_compiles(pipe, timeout=compile_wait_s, cancelled=cancelled)  # a cancelled call stops
        state.one_family = True
        release(pipe, moving_weights=False)
        _empty_cuda_cache()
        log.warning("out of GPU memory while a background compile ran: waited %.1f s for it, graphs dropped",
                    waited)
        return True
    if not holds_graphs(pipe):
        return False  # eager alone does not fit: nothing of ours to give back
    if state.one_family:
        state.graphless.add(state.family)
    state.one_family = True
    release(pipe, moving_weights=False)
    _empty_cuda_cache()
    log.warning("out of GPU memory: CUDA graphs dropped (%s)", "this kind of call runs without graphs from now on"
                if state.captures_off else "keeping one kind of call's from now on")
    return True


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def control_pipeline(cls, base, controlnet):
    """A ControlNet pipeline sharing `base`'s components (see pipeline_like)."""
    return pipeline_like(cls, base, controlnet=controlnet)


def pipeline_like(cls, base, **extra):
    """A pipeline of class `cls` sharing `base`'s components (and its levers), with their dtypes untouched.

    diffusers' `from_pipe` ends with `.to(dtype)`, float32 when no dtype is given: it silently turned the
    shared UNet, text encoders and VAE (so the base pipeline too) into float32 (measured on an H100: every
    later image 4-5x slower, +10 GiB, different pixels); with a dtype it would undo a bfloat16 VAE.
    """
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    parts = {k: v for k, v in base.components.items() if k in accepted and k not in extra}
    if "force_zeros_for_empty_prompt" in accepted:
        parts["force_zeros_for_empty_prompt"] = base.config.get("force_zeros_for_empty_prompt", True)
    if "add_watermarker" in accepted:
        parts["add_watermarker"] = getattr(base, "watermark", None) is not None
    pipe = cls(**parts, **extra)
    if hasattr(base, STATE_ATTR):
        setattr(pipe, STATE_ATTR, getattr(base, STATE_ATTR))
    return pipe


# ---------------------------------------------------------------------------------------------- VAE, caches
def set_vae_dtype(vae, dtype: torch.dtype) -> None:
    """Decode in `dtype` whatever the latents' dtype (diffusers' per-call float32 upcast is turned off)."""
    vae.to(dtype=dtype)
    vae.register_to_config(force_upcast=False)
    original = vae.decode
    if getattr(original, "_mcp_cast", False):
        return

    @functools.wraps(original)
    def decode(z, *args, **kwargs):
        return original(z.to(vae.dtype), *args, **kwargs)

    encode_original = vae.encode

    @functools.wraps(encode_original)
    def encode(x, *args, **kwargs):  # img2img / inpaint hand the image over in the UNet's dtype
        return encode_original(x.to(vae.dtype), *args, **kwargs)

    decode._mcp_cast = True
    vae.decode = decode
    vae.encode = encode


def _torch_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older torch
        from torch._inductor.runtime.runtime_utils import default_cache_dir
    return default_cache_dir()


def _cache_dir(performance, cache_root: Path | None) -> Path:
    directory = Path(os.path.expanduser(getattr(performance, "compile_cache_dir", "cache/torch")))
    if not directory.is_absolute():
        directory = Path(cache_root or Path.home() / ".mcp-sdxl") / directory
    return directory


def configure_compile_cache(directory: Path) -> Path:
    """On-disk inductor (FX graph, AOTAutograd) and Triton caches under `directory` (env vars a user set win).

    torch writes its own default (/tmp/torchinductor_<user>) into TORCHINDUCTOR_CACHE_DIR the first time
    anything asks for the cache folder, which importing diffusers already does: a value equal to that
    default is torch's, not the user's, and is replaced (a plain setdefault kept every cache in /tmp)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(_torch_default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(directory / "triton"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    with contextlib.suppress(Exception):
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True
    return directory
