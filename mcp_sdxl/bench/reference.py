"""The reference: plain diffusers pipelines the seed's way (eager fp16, SDPA, peft adapters left unfused)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time

from mcp_sdxl.bench.assets import Assets
from mcp_sdxl.bench.plan import NEGATIVE, PROMPT, SEED, Plan, Vram, _sync, compare, log, measure, scenario_inputs
from mcp_sdxl.bench.report import Report


# ------------------------------------------------------------------------------------------------ reference
def run_reference(settings, plan: Plan, assets: Assets, maps: dict, vram: Vram, report: Report, scenarios) -> dict:
    """The seed's way: plain diffusers pipelines, eager, peft adapters left unfused."""
    import torch
    from compel import CompelForSDXL
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLControlNetPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from mcp_sdxl.engine import loading

    dtype = torch.float16 if plan.device == "cuda" else torch.float32
    out = report.data["reference"]
    images = {}
    started = time.perf_counter()
    cfg = settings.sdxl
    variant = cfg.model.variant if assets.kind == "real" else None
    pipe = loading.load_sdxl_pipeline(assets.source, dtype, variant=variant, cache_dir=cfg.model.cache_dir)
    own = getattr(loading, "own_memory", None)
    if plan.device == "cpu" and own is not None:  # as the engine does on the CPU (aligned weights)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                own(component)
    pipe.to(plan.device)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    _sync()
    out["load_s"] = round(time.perf_counter() - started, 3)
    out["resident"] = vram.now()
    compel = CompelForSDXL(pipe, device=plan.device)

    def encode():
        with torch.inference_mode():
            c = compel(PROMPT, negative_prompt=NEGATIVE)
        return {"prompt_embeds": c.embeds, "pooled_prompt_embeds": c.pooled_embeds,
                "negative_prompt_embeds": c.negative_embeds, "negative_pooled_prompt_embeds": c.negative_pooled_embeds}

    # prompt encoding cost: compel (what the engine uses) and diffusers' own encode_prompt
    encode()
    out["encode_compel_s"] = _median_time(encode, 5)
    with torch.inference_mode():
        out["encode_diffusers_s"] = _median_time(
            lambda: pipe.encode_prompt(PROMPT, device=plan.device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=True, negative_prompt=NEGATIVE), 5)
    report.save()

    def run(p, extra, callback=None):
        def once():
            t0 = time.perf_counter()
            embeds = encode()
            encode_s = time.perf_counter() - t0
            generator = torch.Generator("cpu").manual_seed(SEED)
            with torch.inference_mode():
                result = p(**embeds, **extra, width=plan.width, height=plan.height, num_inference_steps=plan.steps,
                           guidance_scale=plan.cfg, generator=generator, output_type="pil",
                           callback_on_step_end=callback)
            return result.images[0], {"encode_s": encode_s}

        return once

    cn_models = {}

    def controlnet(kind):
        if kind not in cn_models:
            cn_models[kind] = loading.load_controlnet(loading.WeightSource("folder", str(assets.controlnets[kind])),
                                                      dtype).to(plan.device)
        return cn_models[kind]

    order = [s for s in ("base", "cn1", "cn2", "cn1_window", "loras3") if s in scenarios]
    for name in order:
        if plan.left() < 30:
            out[name] = {"skipped": "time budget"}
            continue
        try:
            inputs = scenario_inputs(name, assets, maps)
            extra, p = {}, pipe
            if inputs["controls"]:
                nets = [controlnet(kind) for kind, _, _ in inputs["controls"]]
                # from_pipe needs the dtype: without it diffusers casts every shared component to float32
                if len(nets) == 1:  # the seed's way: a single ControlNetModel
                    p = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=nets[0], torch_dtype=dtype)
                    extra = {"image": inputs["controls"][0][1],
                             "controlnet_conditioning_scale": inputs["controls"][0][2]}
                else:
                    p = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=MultiControlNetModel(nets),
                                                                      torch_dtype=dtype)
                    extra = {"image": [c[1] for c in inputs["controls"]],
                             "controlnet_conditioning_scale": [c[2] for c in inputs["controls"]]}
                start, end = inputs.get("window", (0.0, 1.0))
                extra.update(control_guidance_start=start, control_guidance_end=end)
                p.set_progress_bar_config(disable=True)
            if inputs["loras"]:
                t0 = time.perf_counter()
                for asset, _ in inputs["loras"]:
                    pipe.load_lora_weights(str(assets.loras[asset]), adapter_name=asset)
                pipe.set_adapters([a for a, _ in inputs["loras"]], adapter_weights=[w for _, w in inputs["loras"]])
                out["lora_load_s"] = round(time.perf_counter() - t0, 3)
                t0 = time.perf_counter()
                pipe.set_adapters(["char_a", "background", "style"], adapter_weights=[0.7, 0.6, 0.5])
                pipe.set_adapters([a for a, _ in inputs["loras"]], adapter_weights=[w for _, w in inputs["loras"]])
                out["lora_set_adapters_s"] = round((time.perf_counter() - t0) / 2, 4)
            result = measure(plan, vram, run(p, extra))
            images[name] = result.pop("_image")
            out[name] = result
            log.info("reference %s: %.3f s/image", name, result["median_s"])
            if name == "loras3":  # the same adapters fused by diffusers: the engine's arithmetic
                pipe.fuse_lora()
                single = dataclasses.replace(plan, warmups=0, repeats=1)
                fused = measure(single, vram, run(p, extra))
                images["loras3_fused"] = fused.pop("_image")
                out["loras3_fused"] = fused
                out["loras3_fused"]["vs_unfused"] = compare(images["loras3_fused"], images["loras3"])
            if name == "cn1" and plan.full and os.environ.get("MCP_SDXL_BENCH_DIAGNOSE"):
                out["cn1_diagnosis"] = _diagnose_controlnet(p, controlnet("canny"), extra, encode, plan, vram)
        except Exception as exc:
            out[name] = {"error": report.error(f"reference/{name}", exc)}
        report.save()
    # VAE decode cost by precision (one 1024x1024 latent)
    if plan.full and plan.left() > 30:
        with contextlib.suppress(Exception):
            out["vae_decode_ms"] = _vae_decode_costs(pipe, plan)
    report.save()
    return images


def _diagnose_controlnet(pipe, net, extra, encode, plan: Plan, vram: Vram) -> dict:
    """Why a ControlNet step costs what it does: one forward alone (cuDNN heuristics vs autotuning), the
    conditioning embedding alone, and a profile of a 3-step pipeline run (top CUDA kernels)."""
    import torch

    out = {}
    g = torch.Generator("cuda").manual_seed(5)
    lat = plan.height // 8
    x = torch.randn(2, 4, lat, lat, device="cuda", dtype=torch.float16, generator=g)
    ehs = torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16, generator=g)
    added = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16, generator=g),
             "time_ids": torch.tensor([[plan.height, plan.width, 0, 0, plan.height, plan.width]] * 2, device="cuda",
                                      dtype=torch.float16)}
    image = torch.rand(2, 3, plan.height, plan.width, device="cuda", dtype=torch.float16, generator=g)
    t = torch.tensor(500, device="cuda")
    with torch.inference_mode():
        forward = lambda: net(x, t, ehs, image, 1.0, added_cond_kwargs=added, return_dict=False)  # noqa: E731
        embed = lambda: net.controlnet_cond_embedding(image)  # noqa: E731
        unet = lambda: pipe.unet(x, t, ehs, added_cond_kwargs=added, return_dict=False)  # noqa: E731
        forward()
        vram.reset()
        out["forward_ms"] = round(_median_time(forward, 5) * 1000, 2)
        out["forward_peak_alloc_gib"] = vram.peaks().get("peak_allocated_gib")
        out["cond_embedding_ms"] = round(_median_time(embed, 5) * 1000, 2)
        out["unet_forward_ms"] = round(_median_time(unet, 5) * 1000, 2)
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            forward(), forward(), embed(), embed()
            out["forward_ms_cudnn_benchmark"] = round(_median_time(forward, 5) * 1000, 2)
            out["cond_embedding_ms_cudnn_benchmark"] = round(_median_time(embed, 5) * 1000, 2)
        finally:
            torch.backends.cudnn.benchmark = before
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            embeds = encode()
            pipe(**embeds, **extra, width=plan.width, height=plan.height, num_inference_steps=3,
                 guidance_scale=plan.cfg, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pil")
            _sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
        out["profile_3_steps_by_cuda_time"] = table.splitlines()
        out["profile_3_steps_by_cpu_time"] = prof.key_averages().table(
            sort_by="cpu_time_total", row_limit=15, max_name_column_width=70).splitlines()
    return out


def _median_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 4)


def _vae_decode_costs(pipe, plan: Plan) -> dict:
    """The VAE decode alone: milliseconds, the peak memory it adds (its activations and cuDNN's workspaces)
    and the image against float32, per dtype; bfloat16 also in channels_last (NHWC) layout."""
    import torch

    vae = pipe.vae
    latent = torch.randn(1, 4, plan.height // 8, plan.width // 8, device="cuda", dtype=torch.float16,
                         generator=torch.Generator("cuda").manual_seed(3))
    out = {}
    reference = None
    variants = (("float32", torch.float32, torch.contiguous_format), ("bfloat16", torch.bfloat16, torch.contiguous_format),
                ("float16", torch.float16, torch.contiguous_format),
                ("bfloat16_channels_last", torch.bfloat16, torch.channels_last))
    for name, dtype, layout in variants:
        vae.to(dtype=dtype, memory_format=layout)
        with torch.inference_mode():
            decode = lambda: vae.decode(latent.to(dtype) / vae.config.scaling_factor).sample  # noqa: E731
            decode()
            out[name] = round(_median_time(decode, 5) * 1000, 2)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            image = decode().float()
            torch.cuda.synchronize()
            out[f"{name}_adds_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)
        if reference is None:
            reference = image
        else:
            out[f"{name}_vs_float32_mean_abs_255"] = round(float((image - reference).abs().mean() * 127.5), 4)
    vae.to(dtype=torch.float16, memory_format=torch.contiguous_format)
    return out
