"""The benchmark's results: the JSON report, the summary against the targets, the Markdown table, the contact sheet."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import numpy as np

from mcp_sdxl.bench.plan import TOLERANCE, Plan, log


# ------------------------------------------------------------------------------------------------ report
class Report:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"meta": {}, "setup": {}, "reference": {}, "engine": {}, "cold_start": {}, "micro": {},
                           "errors": []}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default))
        os.replace(tmp, self.path)

    def error(self, where: str, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        self.data["errors"].append({"where": where, "error": text[:2000], "trace": traceback.format_exc()[-3000:]})
        log.error("%s: %s", where, text)
        self.save()
        return text


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


# ------------------------------------------------------------------------------------------------ summary
TARGETS = [("base", 1.2), ("loras3", 1.3), ("cn1", 1.8)]


def summarise(data: dict, plan: Plan) -> dict:
    targets = []
    engine = data.get("engine", {})
    default = engine.get(plan.variants[0][0], {}) if plan.variants else {}
    scen = default.get("scenarios", {}) if isinstance(default, dict) else {}
    if plan.full:
        for name, limit in TARGETS:
            value = scen.get(name, {}).get("median_s")
            targets.append({"target": f"{name} <= {limit} s/image", "value": value,
                            "met": value is not None and value <= limit})
        base, loras = scen.get("base", {}).get("median_s"), scen.get("loras3", {}).get("median_s")
        if base and loras:
            targets.append({"target": "3 LoRAs <= 10 % over base", "value": round(loras / base - 1, 4),
                            "met": loras / base - 1 <= 0.10})
        switch = default.get("lora_switch", {})
        if switch:
            worst = max((v.get("lora_s") or 0) for v in switch.values())
            targets.append({"target": "LoRA switch < 1 s", "value": worst, "met": worst < 1.0})
        peaks = [s.get("peak_reserved_gib") for v in engine.values() if isinstance(v, dict)
                 for s in v.get("scenarios", {}).values() if isinstance(s, dict) and s.get("peak_reserved_gib")]
        if peaks:
            targets.append({"target": "peak VRAM <= 15.5 GiB (torch reserved, every engine scenario)",
                            "value": max(peaks), "met": max(peaks) <= 15.5})
        cold = data.get("cold_start", {})
        limits = {"cold compile cache": 60, "warm compile cache": 30, "no-compile": 30}
        for label in cold:
            limit = next((v for k, v in limits.items() if label.endswith(k)), None)
            value = cold[label].get("first_image") if isinstance(cold[label], dict) else None
            if limit is not None and value is not None:
                targets.append({"target": f"start to first image ({label}) <= {limit} s", "value": value,
                                "met": value <= limit})
    checks = [s.get("output_check", {}).get("pass") for v in engine.values() if isinstance(v, dict)
              for s in v.get("scenarios", {}).values() if isinstance(s, dict) and "output_check" in s]
    if checks:
        targets.append({"target": f"output check (mean |diff| <= {TOLERANCE['mean_abs_max']}/255, "
                                  f"PSNR >= {TOLERANCE['psnr_db_min']} dB) in every engine scenario",
                        "value": f"{sum(bool(c) for c in checks)}/{len(checks)} pass", "met": all(checks)})
    return {"targets": targets}


def render(data: dict, summary: dict) -> str:
    meta = data["meta"]
    lines = [f"# mcp-sdxl bench — {meta.get('gpu', meta.get('device'))}, {meta['size'][0]}x{meta['size'][1]}, "
             f"{meta['steps']} steps, weights: {data['setup'].get('weights')}", "",
             f"command: `{meta['command']}`", ""]
    ref = data.get("reference", {})
    lines += ["| engine variant | scenario | s/image (median) | first call s | vs reference | peak alloc GiB | "
              "peak reserved GiB | NVML peak GiB | output Δ mean/255 (PSNR) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("base", "loras3", "loras3_fused", "cn1", "cn2", "cn1_window"):
        r = ref.get(name)
        if isinstance(r, dict) and "median_s" in r:
            lines.append(f"| reference (plain diffusers) | {name} | {r['median_s']:.3f} | {r['first_call_s']:.3f} | 1.00 | "
                         f"{r.get('peak_allocated_gib', '')} | {r.get('peak_reserved_gib', '')} | "
                         f"{r.get('nvml_peak_used_gib', '')} | |")
    for variant, v in data.get("engine", {}).items():
        if not isinstance(v, dict):
            continue
        for name, s in v.get("scenarios", {}).items():
            if not isinstance(s, dict) or "median_s" not in s:
                lines.append(f"| {variant} | {name} | {s.get('error', s.get('skipped', '?'))[:80]} | | | | | | |")
                continue
            check = s.get("output_check", {})
            delta = f"{check['mean_abs']:.3f} ({check['psnr_db']})" if check else ""
            lines.append(f"| {variant} | {name} | {s['median_s']:.3f} | {s['first_call_s']:.3f} | "
                         f"{s.get('speedup_vs_reference', '')}x | {s.get('peak_allocated_gib', '')} | "
                         f"{s.get('peak_reserved_gib', '')} | {s.get('nvml_peak_used_gib', '')} | {delta} |")
    lines.append("")
    for variant, v in data.get("engine", {}).items():
        if isinstance(v, dict) and v.get("load_s") is not None:
            lines.append(f"- {variant}: load {v['load_s']} s; levers {v.get('levers_applied', {})}")
        if isinstance(v, dict) and v.get("lora_switch"):
            lines.append("  - LoRA switch: " + ", ".join(f"{k} {x['lora_s']} s" for k, x in v["lora_switch"].items()))
        if isinstance(v, dict) and isinstance(v.get("release"), dict) and "offload_s" in v["release"]:
            r = v["release"]
            lines.append(f"  - release: offload {r['offload_s']} s (VRAM after {r.get('after_offload')}), re-acquire "
                         f"{r.get('reacquire_from_cpu_s')} s, first image after {r.get('first_image_after_reacquire_s')} s; "
                         f"again: offload {r.get('offload_again_s')} s, re-acquire {r.get('reacquire_from_cpu_again_s')} s; "
                         f"unload {r.get('unload_s')} s (VRAM after {r.get('after_unload')}), reload "
                         f"{r.get('reload_from_disk_s')} s; same image after each: {r.get('same_image_after')}"
                         + (f"; error: {r['error'][:120]}" if r.get("error") else ""))
    if ref.get("encode_compel_s") is not None:
        lines.append(f"- prompt encoding: compel {ref['encode_compel_s']} s, diffusers encode_prompt "
                     f"{ref.get('encode_diffusers_s')} s; reference load {ref.get('load_s')} s")
    if ref.get("vae_decode_ms"):
        lines.append(f"- VAE decode ms: {ref['vae_decode_ms']}")
    for label, c in data.get("cold_start", {}).items():
        if isinstance(c, dict) and "first_image" in c:
            lines.append(f"- cold start {label}: imported {c.get('imported')} s, loaded {c.get('loaded')} s, first image "
                         f"{c['first_image']} s, second image took {c.get('second_image_s')} s"
                         + (f"; compiled (background) at {c['compiled']} s, then an image took {c['compiled_image_s']} s"
                            if "compiled" in c else ""))
        elif isinstance(c, dict):
            lines.append(f"- cold start {label}: {c.get('error', c.get('skipped'))}")
    if summary["targets"]:
        lines += ["", "| target | value | met |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |" for t in summary["targets"]]
    if data.get("errors"):
        lines += ["", f"errors: {len(data['errors'])}"] + [f"- {e['where']}: {e['error'][:300]}" for e in data["errors"]]
    lines.append(f"\ntotal {meta.get('total_s')} s")
    return "\n".join(lines) + "\n"


def _contact_sheet(ref_images: dict, report: Report) -> None:
    """reference | engine (default variant) for the base scenario, side by side, next to the JSON."""
    if "base" not in ref_images or "_engine_base" not in ref_images:
        return
    from PIL import Image

    a, b = ref_images["base"], ref_images["_engine_base"]
    size = (256, 256 * a.height // a.width)
    sheet = Image.new("RGB", (size[0] * 2 + 8, size[1]), "white")
    sheet.paste(a.resize(size), (0, 0))
    sheet.paste(b.resize(size), (size[0] + 8, 0))
    sheet.save(report.path.with_suffix(".png"))
