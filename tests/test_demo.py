"""`mcp-sdxl demo` end to end: a real stdio MCP client drives the server; the gallery renders in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image


def test_demo_runs_whole_flow_and_gallery_renders(home, config_dir, tmp_path):
    out = tmp_path / "gallery"
    run = subprocess.run(
        [sys.executable, "-m", "mcp_sdxl", "demo", "--profile", "tiny", "--home", str(home),
         "--config-dir", str(config_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "demo finished: 11/11 calls succeeded" in run.stdout, run.stdout
    # the server's stderr (the demo passes it through) holds our own log lines only: no library chatter
    # (diffusers' torch_dtype FutureWarning, peft's peft_config warning, OpenCV's WARN, MediaPipe/TFLite)
    foreign = [line for line in run.stderr.splitlines()
               if line.strip() and not re.match(r"\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING|ERROR) mcp_sdxl", line)]
    assert not foreign, "\n".join(foreign[:20])
    page = (out / "index.html").read_text()
    for tool in ("list_characters", "generate_character", "generate_with_control", "score_consistency", "release_gpu"):
        assert tool in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) >= 8  # 2 candidates + pose preset (image+map) + photo pose (image+map) + canny (image+map)
    for name in images:
        with Image.open(out / name) as img:
            assert img.size[0] >= 64
    assert (home / "outputs").is_dir() and len(list((home / "outputs").glob("img_*.png"))) >= 8

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("gallery written; rendering check needs Debian's chromium (apt-get install chromium)")
    shot = tmp_path / "gallery.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}",
         "--window-size=1200,2400", f"--screenshot={shot}", (out / "index.html").as_uri()],
        capture_output=True, timeout=120,
    )
    with Image.open(shot) as img:
        colours = img.convert("RGB").resize((120, 240)).getcolors(120 * 240)
    assert colours is not None and len(colours) > 200  # images and text drew, not a blank page
