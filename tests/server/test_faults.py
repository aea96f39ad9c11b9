"""Faults and crashes: out-of-memory inside the real pipeline, corrupt model/LoRA/config files, an output
folder that cannot be written, an LLM backend that is down, and a server SIGKILLed mid-generation."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import types

import anyio
import pytest
import torch
from lease_fakes import FakeVllm
from mcp import Client
from mcp_procs import assert_store_consistent, configure, free_port, small, store_files, text_of

from mcp_sdxl.errors import ConfigError
from mcp_sdxl.server import build_server

pytestmark = pytest.mark.anyio


def _studio(config_dir, home):
    from mcp_sdxl.config import load_settings
    from mcp_sdxl.studio import Studio

    return Studio(load_settings(config_dir, home=home, profile="tiny"))


@pytest.fixture
def studio(config_dir, home):
    configure(config_dir, server={"job_budget_s": 1e6})
    studio = _studio(config_dir, home)
    yield studio
    studio.close()


async def _generate(client, **overrides):
    return await client.call_tool("generate_character", small(**overrides))


def _engine_free(studio) -> bool:
    if not studio.engine._lock.acquire(timeout=2):
        return False
    studio.engine._lock.release()
    return True


# ---------------------------------------------------------------------------- out of memory
async def test_cuda_oom_in_the_unet_is_clear_and_the_engine_recovers(studio):
    output = studio.store.output_dir
    async with Client(build_server(studio)) as client:
        assert not (await _generate(client)).is_error  # the pipeline is loaded
        unet = studio.engine.pipe.unet
        real_forward = unet.forward
        calls = {"n": 0}

        def forward(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # second denoising step of the next image: mid-generation
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_forward(*args, **kwargs)

        unet.forward = forward
        try:
            before = assert_store_consistent(output)
            failed = await _generate(client, num_candidates=2, steps=3)
            assert failed.is_error
            text = text_of(failed)
            assert "ran out of memory" in text and "smaller size" in text, text
            assert "Error executing tool generate_character" == text.split(":")[0]
            assert assert_store_consistent(output) == before  # nothing of the failed batch is kept
            assert _engine_free(studio)
            status = (await client.call_tool("gpu_status", {})).structured_content
            assert status["queue"]["running"] is None and status["engine"]["state"] == "ready"
            again = await _generate(client, num_candidates=2, steps=3)  # the fault struck once
            assert not again.is_error, text_of(again)
            assert len(assert_store_consistent(output)) == len(before) + 2
        finally:
            unet.forward = real_forward


# ---------------------------------------------------------------------------- corrupt files
async def test_corrupt_model_file_is_named_and_the_lease_is_given_back(config_dir, tmp_path, tiny_cache):
    home = tmp_path / "private-home"
    home.mkdir()
    shutil.copytree(tiny_cache, home / "tiny")  # a private copy: the session's build stays intact
    weights = home / "tiny" / "sdxl-tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])  # truncated download
    studio = _studio(config_dir, home)
    try:
        async with Client(build_server(studio)) as client:
            result = await _generate(client)
            assert result.is_error
            text = text_of(result)
            assert "cannot load SDXL weights" in text and str(weights) in text, text
            status = (await client.call_tool("gpu_status", {})).structured_content
            assert status["lease"]["state"] == "free" and status["engine"]["state"] == "unloaded"
            weights.write_bytes(data)  # repaired: the next call loads and works
            result = await _generate(client)
            assert not result.is_error, text_of(result)
    finally:
        studio.close()


async def test_corrupt_lora_file_is_named_and_the_next_call_works(studio, tmp_path):
    corrupt = tmp_path / "luca_character.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file" * 100)
    real_lora_file = studio.engine.lora_file
    async with Client(build_server(studio)) as client:
        studio.engine.lora_file = lambda kind, name: corrupt if kind == "character" else real_lora_file(kind, name)
        result = await _generate(client)
        assert result.is_error
        text = text_of(result)
        assert str(corrupt) in text and "could not be loaded" in text, text
        assert _engine_free(studio)
        studio.engine.lora_file = real_lora_file
        result = await _generate(client)
        assert not result.is_error, text_of(result)
        assert [lo["name"] for lo in result.structured_content["loras"]] == ["luca", "pixar_3d"]


@pytest.mark.parametrize("name, damage, expected", [
    ("sdxl_config.yaml", "server:\n  queue_limit: [unclosed\n", "sdxl_config.yaml"),
    ("sdxl_config.yaml", None, "server.queue_limit"),
    ("lora_registry.yaml", "characters: 5\n", "lora_registry.yaml"),
    ("character_presets.yaml", "\x00\x01binary", "character_presets.yaml"),
    ("lease.yaml", "llm: {backend: teleport}\n", "lease.yaml"),
])
def test_corrupt_config_files_stop_serve_with_a_message_naming_them(config_dir, home, capsys, name, damage, expected):
    from mcp_sdxl import cli

    path = config_dir / name
    if damage is None:
        configure(config_dir, server={"queue_limit": "many"})
    else:
        path.write_text(damage)
    code = cli.main(["serve", "--profile", "tiny", "--home", str(home), "--config-dir", str(config_dir)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "configuration error" in err and str(config_dir) in err and expected in err, err


def test_output_folder_that_is_a_file_is_a_config_error(config_dir, home):
    (home / "outputs").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"server.output_dir: cannot use .*outputs as a folder"):
        _studio(config_dir, home)


# ---------------------------------------------------------------------------- unwritable / full output folder
async def test_output_folder_removed_while_serving(studio):
    output = studio.store.output_dir
    async with Client(build_server(studio)) as client:
        assert not (await _generate(client)).is_error
        kept = store_files(output)
        moved = output.with_name("outputs-moved")
        output.rename(moved)
        output.write_text("someone put a file here")
        try:
            result = await _generate(client, num_candidates=2)
            assert result.is_error
            text = text_of(result)
            assert f"cannot write to the output folder {output}" in text and "writable folder" in text, text
        finally:
            output.unlink()
            moved.rename(output)
        assert store_files(output) == kept
        assert not (await _generate(client)).is_error


async def test_full_disk_mid_batch_keeps_nothing(studio, monkeypatch):
    """ENOSPC on the 2nd image of a batch (fsync fails, as on a full disk): a clear error, no temp
    files, and the 1st image of the batch is removed too (a call's images are all-or-nothing)."""
    import mcp_sdxl.store as store_module

    output = studio.store.output_dir
    writes = {"n": 0}

    def fsync(fd):
        writes["n"] += 1
        if writes["n"] >= 4:  # image 1 lands (journal entry, json, png); image 2's first write fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.fsync(fd)

    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake_os.fsync = fsync
    async with Client(build_server(studio)) as client:
        assert not (await _generate(client)).is_error
        before = assert_store_consistent(output)
        monkeypatch.setattr(store_module, "os", fake_os)
        result = await _generate(client, num_candidates=2)
        monkeypatch.setattr(store_module, "os", os)
        assert writes["n"] == 4  # image 1 was written completely before the disk filled up
        assert result.is_error
        text = text_of(result)
        assert "No space left on device" in text and "Free some disk space" in text, text
        assert assert_store_consistent(output) == before  # no .tmp, no journal, no image 1
        assert not (await _generate(client, num_candidates=2)).is_error


def test_leftovers_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    from PIL import Image

    from mcp_sdxl.store import ImageStore

    out = tmp_path / "out"
    store = ImageStore(out)
    done = store.save(Image.new("RGB", (8, 8)), {"prompt": "kept"})
    batch = store.begin_batch()
    orphan = store.save(Image.new("RGB", (8, 8)), {"prompt": "from a call that never finished"}, batch=batch)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    try:
        # what a SIGKILLed writer (dead pid) and a live one (another server on this folder) leave
        batch.path.rename(out / f".batch-{dead_pid}-0a1b2c3d.pending")
        (out / f".{orphan.id}.png.{dead_pid}-abc123.tmp").write_bytes(b"half a png")
        live_tmp = out / f".img_20260101-000000_0000aaaa.png.{sleeper.pid}-def456.tmp"
        live_tmp.write_bytes(b"being written")
        live_journal = out / f".batch-{sleeper.pid}-99999999.pending"
        live_journal.write_text(done.id + "\n")
        ImageStore(out)  # the next start
        names = store_files(out)
        assert f"{orphan.id}.png" not in names and f"{orphan.id}.json" not in names
        assert not any(n.startswith(f".batch-{dead_pid}") or f".{dead_pid}-" in n for n in names)
        assert live_tmp.name in names and live_journal.name in names and f"{done.id}.png" in names
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------- LLM backend down
async def test_llm_backend_down_is_clear_and_the_gpu_is_not_left_in_limbo(config_dir, home):
    closed = f"http://127.0.0.1:{free_port()}"
    configure(config_dir, lease={"acquire_timeout_s": 2}, llm={"backend": "vllm", "url": closed, "timeout_s": 2})
    studio = _studio(config_dir, home)
    try:
        async with Client(build_server(studio)) as client:
            result = await _generate(client)
            assert result.is_error
            text = text_of(result)
            assert "vllm" in text and closed in text and "release the GPU" in text, text
            status = (await client.call_tool("gpu_status", {})).structured_content
            assert status["lease"]["state"] == "free" and status["lease"]["llm_error"]
            assert status["engine"]["state"] == "unloaded" and status["queue"]["running"] is None
            released = await client.call_tool("release_gpu", {})
            assert not released.is_error and released.structured_content["lease"]["released"] is False
            assert store_files(studio.store.output_dir) == []
    finally:
        studio.close()


# ---------------------------------------------------------------------------- SIGKILL mid-generation
async def test_sigkill_mid_batch_leaves_nothing_and_next_start_recovers(config_dir, home, http_servers):
    vllm = FakeVllm()
    try:
        configure(config_dir, server={"job_budget_s": 1e6},
                  llm={"backend": "vllm", "url": vllm.url, "timeout_s": 5, "warmup": False})
        output = home / "outputs"
        server = http_servers(home, config_dir)
        second_image = anyio.Event()

        async def on_progress(progress, total, message):
            if message.startswith("image 2/2"):
                second_image.set()

        async with anyio.create_task_group() as tg:
            async def call():
                async with server.client() as client:
                    with contextlib.suppress(Exception):  # the server is killed under this call
                        await client.call_tool("generate_character", small(width=128, height=128, steps=60,
                                                                           num_candidates=2),
                                               progress_callback=on_progress)

            tg.start_soon(call)
            with anyio.fail_after(120):
                await second_image.wait()
            assert vllm.sleeping  # the lease put the LLM to sleep for this generation
            left = store_files(output)
            server.kill()
            tg.cancel_scope.cancel()
        # What the dead server left: image 1 of 2, listed in its journal.
        assert any(n.endswith(".png") for n in left) and any(n.endswith(".pending") for n in left), left
        assert vllm.sleeping  # nobody woke it: SIGKILL runs no handler

        restarted = http_servers(home, config_dir)  # same home, same lease folder
        assert not vllm.sleeping  # the new server's start-up woke the LLM the dead one slept
        assert assert_store_consistent(output) == []  # the unfinished batch is gone, no temp files
        async with restarted.client() as client:
            result = await client.call_tool("generate_character", small())
            assert not result.is_error, text_of(result)
            status = (await client.call_tool("gpu_status", {})).structured_content
            assert status["lease"]["state"] == "held_by_us"
        assert restarted.stop() in (0, -15)
        assert not vllm.sleeping  # handed back on shutdown
        assert len(assert_store_consistent(output)) == 1
        assert "POST /wake_up" in vllm.trace()
    finally:
        vllm.close()
