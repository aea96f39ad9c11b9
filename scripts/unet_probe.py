"""Where a full-size SDXL UNet step spends its time on a CUDA GPU, and what wider compilation gains.

Not a test: a measurement for docs/bench (issue 8). Random weights in fp16 (latency does not depend on
their values), batch 2 (classifier-free guidance), 128x128 latents (1024x1024 images), channels_last.
Each experiment reports its first call (the compile) in seconds, ms per step replaying a CUDA graph of
the step, kernel time by category (torch.profiler) and the output against eager (relative L2, cosine).

    OUT=/tmp/probe PROBE_ONLY=sdpa,regional,t2d,t2d_resdyn python scripts/unet_probe.py
    OUT=/tmp/probe PROBE_ONLY=full PROBE_OUT_NAME=full python scripts/unet_probe.py   # minutes

Experiments (eager always runs first: the reference output): sdpa (the attention backends alone),
regional (diffusers' compile_repeated_blocks: the transformer blocks, what the engine does), t2d (whole
Transformer2DModel blocks), t2d_resdyn (those plus resnets and samplers, dynamic shapes), blocks_resdyn,
full (torch.compile of the whole forward). H200 results: docs/bench/h200-s3-unet-probe.json.
"""

import json
import os
import time
import traceback

import torch

OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()
BUDGET = float(os.environ.get("PROBE_BUDGET", "300"))
res: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}


def save():
    with open(f"{OUT}/{os.environ.get('PROBE_OUT_NAME', 'probe')}.json", "w") as f:
        json.dump(res, f, indent=1)


def left():
    return BUDGET - (time.time() - T0)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


from diffusers import UNet2DConditionModel  # noqa: E402

from mcp_sdxl.engine.loading import SDXL_BASE_CONFIG_DIR as cfg  # noqa: E402


def build():
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet")).half().eval()
    unet.requires_grad_(False)
    return unet.to(memory_format=torch.channels_last)


g = torch.Generator("cuda").manual_seed(1)
x = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.half, generator=g).to(memory_format=torch.channels_last)
t = torch.tensor(500, device="cuda")
ehs = torch.randn(2, 77, 2048, device="cuda", dtype=torch.half, generator=g)
added = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.half, generator=g),
         "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, device="cuda", dtype=torch.half)}


def step_fn(unet):
    def step():
        return unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False)[0]
    return step


def time_graph(fn, n=20):
    """ms per call replaying a CUDA graph of fn (after eager warm-ups)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n, out.clone()


def time_eager(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        out = fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n, out


def compare(out, ref):
    out, ref = out.float(), ref.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    return {"rel_l2": round(rel, 5), "cos": round(cos, 6)}


def profile(fn, label):
    from torch.profiler import ProfilerActivity, profile as prof

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    cats: dict = {}
    rows = []
    for e in p.key_averages():
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us <= 0:
            continue
        name = e.key
        low = name.lower()
        if any(k in low for k in ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
            cat = "attention"
        elif any(k in low for k in ("conv", "implicit", "xmma_fprop", "sm90_xmma", "dgrad", "fprop")):
            cat = "conv"
        elif any(k in low for k in ("gemm", "cutlass", "matmul", "_mm", "nvjet", "sm90")):
            cat = "gemm"
        elif "triton" in low:
            cat = "triton (fused elementwise/norm)"
        elif any(k in low for k in ("norm", "elementwise", "reduce", "vectorized", "copy", "cat")):
            cat = "eager elementwise/norm/copy"
        else:
            cat = "other"
        cats[cat] = cats.get(cat, 0) + us
        rows.append((us, e.count, name[:110], cat))
    rows.sort(reverse=True)
    total = sum(cats.values())
    res.setdefault("profile", {})[label] = {
        "total_ms": round(total / 1000, 2),
        "by_category_ms": {k: round(v / 1000, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top": [{"ms": round(us / 1000, 3), "count": c, "name": nm, "cat": cat} for us, c, nm, cat in rows[:30]],
    }
    save()


def attempt(label, fn):
    if left() < 30:
        res[label] = {"skipped": "budget"}
        save()
        return
    log("begin", label)
    try:
        fn()
    except Exception as exc:
        res[label] = {"error": f"{type(exc).__name__}: {exc}"[:600], "trace": traceback.format_exc()[-1500:]}
        log("FAILED", label, exc)
    save()
    log("end", label)


# ---------------------------------------------------------------- 1: fp16 baselines
unet = build()
ref_out = None


def eager():
    global ref_out
    ms, ref_out = time_eager(step_fn(unet))
    res["eager_cl_ms"] = round(ms, 2)
    ms_g, _ = time_graph(step_fn(unet))
    res["eager_cl_graph_ms"] = round(ms_g, 2)
    profile(step_fn(unet), "eager")


attempt("eager", eager)


def sdpa_backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    shapes = {"self_4096_h10": ((2, 10, 4096, 64), (2, 10, 4096, 64)),
              "self_1024_h20": ((2, 20, 1024, 64), (2, 20, 1024, 64)),
              "cross_4096_h10": ((2, 10, 4096, 64), (2, 10, 77, 64)),
              "cross_1024_h20": ((2, 20, 1024, 64), (2, 20, 77, 64))}
    out = {}
    for label, (qs, ks) in shapes.items():
        q = torch.randn(qs, device="cuda", dtype=torch.half)
        k = torch.randn(ks, device="cuda", dtype=torch.half)
        v = torch.randn(ks, device="cuda", dtype=torch.half)
        row = {}
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    ms, _ = time_graph(lambda: F.scaled_dot_product_attention(q, k, v), n=50)
                row[be.name] = round(ms, 4)
            except Exception as exc:
                row[be.name] = f"{type(exc).__name__}: {str(exc)[:100]}"
        out[label] = row
    res["sdpa_ms"] = out


def compiled(label, plan, limit=64):
    """plan: [(class names, dynamic)]"""
    def run():
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = limit
        dynamo.config.cache_size_limit = limit
        u = build()
        n = 0
        for names, dyn in plan:
            for m in u.modules():
                if m.__class__.__name__ in names:
                    m.compile(dynamic=dyn)
                    n += 1
        t0 = time.time()
        step_fn(u)()
        torch.cuda.synchronize()
        res[label + "_first_call_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        ms, out = time_graph(step_fn(u))
        res[label + "_graph_ms"] = round(ms, 2)
        res[label + "_timing_s"] = round(time.time() - t0, 1)
        res[label + "_modules"] = n
        res[label + "_vs_eager"] = compare(out, ref_out)
        profile(step_fn(u), label)
        del u
        torch.cuda.empty_cache()
    return run


def full():
    u = build()
    u.forward = torch.compile(u.forward, dynamic=False)
    t0 = time.time()
    step_fn(u)()
    torch.cuda.synchronize()
    res["full_first_call_s"] = round(time.time() - t0, 1)
    ms, out = time_graph(step_fn(u))
    res["full_graph_ms"] = round(ms, 2)
    res["full_vs_eager"] = compare(out, ref_out)
    profile(step_fn(u), "full")


ONLY = os.environ.get("PROBE_ONLY", "regional,t2d").split(",")
if "sdpa" in ONLY:
    attempt("sdpa", sdpa_backends)
if "regional" in ONLY:
    attempt("regional", compiled("regional", [(["BasicTransformerBlock"], False)]))
if "t2d" in ONLY:
    attempt("t2d", compiled("t2d", [(["Transformer2DModel"], False)]))
if "t2d_resdyn" in ONLY:
    attempt("t2d_resdyn", compiled("t2d_resdyn", [(["Transformer2DModel"], False),
                                                 (["ResnetBlock2D", "Downsample2D", "Upsample2D"], True)]))
if "blocks_resdyn" in ONLY:
    attempt("blocks_resdyn", compiled("blocks_resdyn", [(["BasicTransformerBlock"], False),
                                                       (["ResnetBlock2D", "Downsample2D", "Upsample2D"], True)]))
if "full" in ONLY:
    attempt("full", full)
res["total_s"] = round(time.time() - T0, 1)
save()
log("done")
