"""The benchmark's measuring loop (mcp_sdxl.bench.plan.measure): what it times once compiles run in the
background. The GPU runs it for real (`mcp-sdxl bench`); here a scripted call sequence stands for the
engine, as the compiles hand over on an H200 (docs/bench/README.md, session 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mcp_sdxl.bench.plan import Plan, Vram, measure


def _plan(**kwargs) -> Plan:
    values = dict(device="cpu", full=False, width=8, height=8, steps=1, cfg=1.0, repeats=2, warmups=1, quick=True,
                  variants=[], budget_s=None, workdir=Path("."), vram_limit_gb=None, cold_start=False)
    return Plan(**{**values, **kwargs})


class ScriptedEngine:
    """Each call may hand a compile over (it runs until the next call ends) or capture a new graph;
    a call is slow unless nothing was compiling and nothing new happened in it."""

    def __init__(self, script):
        # per call: "compile" (hands one over, it runs on), "quick_compile" (hands one over that is done by
        # the time the call returns), "capture" (a new graph), or "steady"
        self.script = list(script)
        self.running = False
        self.compiles = self.captures = 0
        self.calls = []

    def busy(self) -> bool:
        return self.running

    def settle(self) -> float:
        self.running = False
        self.compiles += 1
        return 1.0

    def changes(self) -> tuple:
        return (self.compiles, self.captures)

    def run_once(self):
        what = self.script.pop(0) if self.script else "steady"
        steady = what == "steady" and not self.running
        if self.running:  # the compile handed over by the previous call ends during this one
            self.running = False
            self.compiles += 1
        if what == "compile":
            self.running = True
        elif what == "quick_compile":
            self.compiles += 1
        elif what == "capture":
            self.captures += 1
        self.calls.append("steady" if steady else what)
        return np.zeros((2, 2, 3), np.uint8), {}


def test_timed_repeats_wait_until_no_compile_is_handed_over_any_more():
    # the warm-up hands the ControlNet's compile over and it ends at once (a warm cache): nothing runs
    # after the warm-up, yet the next call hands the UNet's over and the one after captures its graph
    engine = ScriptedEngine(["quick_compile", "compile", "capture"])
    result = measure(_plan(), Vram(False), engine.run_once, settle=engine.settle, busy=engine.busy,
                     changes=engine.changes)
    # the two timed calls are the last two and both steady: nothing compiling, nothing new in them
    assert engine.calls == ["quick_compile", "compile", "capture", "steady", "steady", "steady"]
    assert engine.compiles == 2 and engine.captures == 1 and not engine.running
    assert "compile_running_during_repeats" not in result and len(result["seconds"]) == 2


def test_without_background_compiles_nothing_extra_runs():
    engine = ScriptedEngine([])
    measure(_plan(), Vram(False), engine.run_once)
    assert len(engine.calls) == 3  # one warm-up, two timed


def test_reserved_memory_is_summed_by_where_it_sits():
    from mcp_sdxl.bench.plan import reserved_breakdown

    gib = 2**30
    segments = [  # the fields of torch.cuda.memory_snapshot()'s segments that the summary reads
        {"segment_pool_id": (0, 0), "stream": 0, "total_size": 4 * gib, "allocated_size": 3 * gib},
        {"segment_pool_id": (0, 0), "stream": 0, "total_size": gib, "allocated_size": 0},
        {"segment_pool_id": (0, 0), "stream": 94, "total_size": 2 * gib, "allocated_size": 0},
        {"segment_pool_id": (1, 2), "stream": 94, "total_size": 3 * gib, "allocated_size": gib},
    ]
    out = reserved_breakdown(segments, main_stream=0)
    assert out["serving_stream"] == {"reserved_gib": 5.0, "allocated_gib": 3.0, "segments": 2}
    assert out["other_streams"]["reserved_gib"] == 2.0 and out["other_streams"]["allocated_gib"] == 0.0
    assert out["graph_pools"]["reserved_gib"] == 3.0


def test_live_blocks_groups_live_memory_by_place_and_allocating_frames():
    """--memory-blocks: the snapshot's live blocks summed by where they sit (serving stream, another
    stream, a graph pool; the names reserved_by uses) and the first frames outside torch that allocated them, biggest first."""
    from mcp_sdxl.bench.plan import live_blocks

    frame = lambda name, line: {"filename": f"/x/{name}.py", "line": line, "name": "f"}  # noqa: E731
    torch_frame = {"filename": "/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"}
    segments = [
        {"stream": 7, "segment_pool_id": (0, 0), "blocks": [
            {"state": "active_allocated", "size": 2**30, "frames": [torch_frame, frame("engine", 10)]},
            {"state": "active_allocated", "size": 2**30, "frames": [torch_frame, frame("engine", 10)]},
            {"state": "inactive", "size": 5 * 2**30, "frames": []}]},
        {"stream": 9, "segment_pool_id": (0, 0), "blocks": [
            {"state": "active_allocated", "size": 2**25, "frames": [torch_frame]}]},
        {"stream": 7, "segment_pool_id": (1, 2), "blocks": [
            {"state": "active_allocated", "size": 2**29, "frames": [frame("decode", 3)]}]},
    ]
    rows = live_blocks(segments, main_stream=7)
    assert rows[0] == "2.000 GiB x2 serving_stream | engine.py:10 f"
    assert rows[1] == "0.500 GiB x1 graph_pools | decode.py:3 f"
    assert rows[2].startswith("0.031 GiB x1 other_streams | functional.py:1 linear")
    assert len(rows) == 3  # freed blocks are not live
