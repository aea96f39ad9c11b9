"""Qwen-Agent, for real: its own environment (.venv-qwen: qwen-agent + mcp<2) starts `mcp-sdxl serve`
over stdio through its MCPManager, sees our tools as it reduces them, and calls every one; then the
example assistant (examples/qwen_agent) runs a whole agent turn against a fake vLLM in sleep mode."""

from __future__ import annotations

import json
import re
import sys

import anyio
import yaml
from client_fake_vllm import FakeVllm
from client_flow import TOOLS
from client_procs import REPO, run, serve_args, server_env


def _server_tools(settings) -> dict:
    """The tools as the server publishes them (SDK client, in memory)."""
    from mcp import Client

    from mcp_sdxl.server import build_server
    from mcp_sdxl.studio import Studio

    async def listing():
        studio = Studio(settings)
        try:
            async with Client(build_server(studio)) as client:
                return {t.name: t for t in (await client.list_tools()).tools}
        finally:
            studio.close()

    return anyio.run(listing)


def _qwen_config(home, config_dir) -> dict:
    return {"mcpServers": {"sdxl": {"command": sys.executable, "args": serve_args(home, config_dir),
                                    "env": server_env(home)}}}


def test_qwen_agent_mcp_manager_calls_every_tool(qwen_python, client_home, config_dir, settings, tmp_path):
    published = _server_tools(settings)
    config = tmp_path / "qwen_mcp.json"
    config.write_text(json.dumps(_qwen_config(client_home, config_dir)))
    report_path = tmp_path / "qwen_report.json"
    proc = run([str(qwen_python), str(REPO / "tests/clients/qwen_driver.py"), str(config), str(report_path)],
               timeout=240)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    assert proc.returncode == 0 and "error" not in report, (
        f"{report.get('error', '')}\n--- stderr (Qwen-Agent + server) ---\n{proc.stderr[-6000:]}")
    assert report["mcp"].startswith("1."), "Qwen-Agent must run with mcp<2 in its own environment"

    # Tool names become SERVER-TOOL; resources add two tools of Qwen-Agent's own.
    assert set(report["tools"]) == {f"sdxl-{n}" for n in TOOLS} | {"sdxl-list_resources", "sdxl-read_resource"}
    for name in TOOLS:
        seen = report["tools"][f"sdxl-{name}"]
        ours = published[name]
        schema = ours.input_schema
        # Qwen-Agent keeps only {type, properties, required}: nothing else may carry meaning.
        assert set(schema) - {"type", "properties", "required"} <= {"title"}, (name, sorted(schema))
        assert seen["parameters"]["properties"] == schema.get("properties", {}), f"{name}: parameters changed"
        assert seen["parameters"]["required"] == schema.get("required", []), name
        assert seen["description"] == ours.description
        assert "$ref" not in json.dumps(seen["parameters"]), name
    generate = report["tools"]["sdxl-generate_with_control"]["parameters"]["properties"]
    assert {"pose_preset", "pose_image", "depth_image", "canny_image", "control_end", "run_as_job"} <= set(generate)
    assert report["tools"]["sdxl-release_gpu"]["parameters"]["properties"]["mode"]["enum"] == ["offload", "unload"]

    # The flow parsed every tool's JSON text; resources reached through Qwen-Agent's resource tools.
    flow = report["flow"]
    assert {s["tool"] for s in flow["steps"]} == TOOLS
    assert json.loads(report["resources"]["metadata"])["seed"] == 7
    assert {c["name"] for c in json.loads(report["resources"]["characters"])["characters"]} >= {"luca", "alberto"}
    # Qwen-Agent 0.0.34 reads text resources only (a PNG blob gives its fixed failure text): the tool
    # results therefore carry ids and paths as text, which is all the model needs.
    assert report["resources"]["png"] == "Failed to read resource"


# ---------------------------------------------------------------------------- the example assistant
def _scripted_llm(messages: list[dict]) -> str:
    """What a Qwen3 model would answer, one step per turn, in Qwen-Agent's nous tool-call format."""
    text = json.dumps(messages)
    responses = re.findall(r"<tool_response>\\n(.*?)\\n</tool_response>", text)
    if not responses:
        return '<tool_call>\n{"name": "sdxl-list_characters", "arguments": {}}\n</tool_call>'
    if len(responses) == 1:
        args = {"character": "luca", "scene_description": "waving on the beach", "width": 64, "height": 64,
                "steps": 2, "seed": 5, "filter_consistency": False}
        return f'<tool_call>\n{json.dumps({"name": "sdxl-generate_character", "arguments": args})}\n</tool_call>'
    ids = re.findall(r"img_[0-9]{8}-[0-9]{6}_[0-9a-f]+", responses[-1])
    return f"Here is Luca waving on the beach: {ids[0] if ids else 'NO IMAGE ID SEEN'}."


def test_example_assistant_with_vllm_in_sleep_mode(qwen_python, client_home, config_dir, tmp_path):
    """examples/qwen_agent (make_configs.sh, assistant.py): list, generate, answer. The server sleeps vLLM
    for the render; the agent's next LLM turn must find it awake (a sleeping vLLM cannot answer).

    A waking vLLM takes 1.5 s here (0.3-6 s for real): if the server returned the tool result before
    the GPU was handed back and the LLM woken (idle_release_s 0 released on a timer thread after the
    job had finished), the agent's next chat would reach vLLM during /wake_up."""
    vllm = FakeVllm(_scripted_llm, wake_delay_s=1.5)
    try:
        # The documented setup: make_configs.sh, then this machine's vLLM URL and a private lease folder.
        made = run(["bash", str(REPO / "examples/qwen_agent/make_configs.sh"), str(config_dir)], timeout=30)
        assert made.returncode == 0, made.stderr
        lease = yaml.safe_load((config_dir / "lease.yaml").read_text())
        assert lease["idle_release_s"] == 0 and lease["llm"]["backend"] == "vllm"
        lease["llm"]["url"] = vllm.url
        lease["runtime_dir"] = str(tmp_path / "runtime")
        (config_dir / "lease.yaml").write_text(yaml.safe_dump(lease))
        assert yaml.safe_load((config_dir / "sdxl_config.yaml").read_text())["server"]["job_budget_s"] == 3600
        out = tmp_path / "conversation.json"
        env = {**server_env(client_home), "QWEN_AGENT_DEFAULT_WORKSPACE": str(tmp_path / "workspace")}
        proc = run([str(qwen_python), str(REPO / "examples/qwen_agent/assistant.py"), "--llm-url", f"{vllm.url}/v1",
                    "--server-python", sys.executable, "--config-dir", str(config_dir), "--home", str(client_home),
                    "--profile", "tiny", "--query", "Draw Luca waving on the beach", "--messages-out", str(out)],
                   timeout=240, env=env, cwd=tmp_path)
    finally:
        vllm.close()
    trace = "\n".join(vllm.trace)
    assert not vllm.chat_while_sleeping, (
        "the agent's next LLM request reached vLLM while it was still asleep: the tool result came back "
        f"before the GPU was handed back and the LLM woken.\ntrace:\n{trace}\nstderr:\n{proc.stderr[-4000:]}")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}\ntrace:\n{trace}"
    conversation = json.loads(out.read_text())
    calls = [m["function_call"]["name"] for m in conversation if m.get("function_call")]
    assert calls == ["sdxl-list_characters", "sdxl-generate_character"]
    result = json.loads(next(m["content"] for m in conversation if m.get("role") == "function"
                             and m.get("name") == "sdxl-generate_character"))
    image_id = result["images"][0]["id"]
    assert f"Here is Luca waving on the beach: {image_id}." in proc.stdout
    # The tools reached the model inside its prompt with every parameter.
    system = vllm.chats[0]["messages"][0]["content"]
    assert "sdxl-generate_with_control" in system and "pose_preset" in system and "filter_consistency" in system
    # Hand-over order: chat, chat (asks for the render), sleep, render, wake, warm-up, chat (answer).
    assert vllm.trace.index("POST /sleep?level=1") < vllm.trace.index("POST /wake_up") < vllm.trace.index("chat#3")
    assert len(vllm.chats) == 3


def test_tool_descriptions_reach_prompts_without_source_indentation(settings):
    """Qwen-Agent writes each description into the LLM's system prompt verbatim (so do other clients):
    the docstrings' source indentation (8 spaces per continuation line) would be noise in every prompt."""
    for name, tool in _server_tools(settings).items():
        assert "\n " not in tool.description, f"{name}: {tool.description!r}"
