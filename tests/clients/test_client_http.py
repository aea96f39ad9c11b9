"""Streamable HTTP with remote clients in other processes: the official SDK client runs the whole flow
against `mcp-sdxl serve --http` (with a bearer token), then examples/http_client.py works as documented."""

from __future__ import annotations

import json
import sys

from client_flow import TOOLS
from client_procs import HTTP_TOKEN as TOKEN
from client_procs import REPO, run

CLAUDE_DESKTOP_LIMIT = 1_048_576


def test_sdk_client_and_example_over_http(shared_http_server, tmp_path):
    server = shared_http_server
    report_path = tmp_path / "http_report.json"
    proc = run([sys.executable, str(REPO / "tests/clients/sdk_http_driver.py"), server.url, TOKEN, str(report_path)],
               timeout=240)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    assert proc.returncode == 0 and "error" not in report, (
        f"{report.get('error', proc.stderr[-4000:])}\n--- server log ---\n{server.log()}")
    assert set(report["tools"]) == TOOLS
    assert {s["tool"] for s in report["flow"]["steps"]} == TOOLS
    # Progress notifications travel over the HTTP stream, increasing.
    done = [p[0] for p in report["progress"]]
    assert done and done == sorted(done), report["progress"]
    assert report["content_types"][0] == "text" and "image" in report["content_types"]
    assert report["preview"]["mime"] in ("image/webp", "image/jpeg") and report["preview"]["bytes"] > 100
    assert report["png_magic"] == "89504e470d0a1a0a"
    assert max(report["sizes"].values()) < CLAUDE_DESKTOP_LIMIT, report["sizes"]

    # examples/http_client.py against the same server (one server start saved).
    out = tmp_path / "pictures"
    proc = run([sys.executable, str(REPO / "examples/http_client.py"), "--url", server.url, "--token", TOKEN,
                "--character", "alberto", "--scene", "on a vespa", "--size", "64", "--steps", "2", "--out", str(out)],
               timeout=180)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}\n--- server log ---\n{server.log()}"
    assert "generate_character" in proc.stdout and "GPU released: True" in proc.stdout
    saved = list(out.glob("img_*.png"))
    assert len(saved) == 1 and saved[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "progress" in proc.stderr

    wrong = run([sys.executable, str(REPO / "examples/http_client.py"), "--url", server.url, "--token", "wrong",
                 "--out", str(out)], timeout=120)
    assert wrong.returncode == 2 and "error: cannot use" in wrong.stderr and "Traceback" not in wrong.stderr
