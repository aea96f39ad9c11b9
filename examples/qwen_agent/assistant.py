"""A Qwen-Agent assistant that draws characters with mcp-sdxl, talking to a local vLLM on the same GPU.

The LLM is a local vLLM started in sleep mode (see vllm_serve.sh); mcp-sdxl puts it to sleep before it
renders and wakes it afterwards, so one GPU serves both. Make the server's config folder with
make_configs.sh (lease.yaml beside this file, blocking generation calls).

Run it with the Python of a SEPARATE environment that has qwen-agent and mcp<2 (qwen-agent imports
names that mcp 2.x removed; scripts/setup_clients.sh builds one at .venv-qwen/). The server itself
runs with mcp-sdxl's own Python, given by --server-python:

    .venv-qwen/bin/python examples/qwen_agent/assistant.py \\
        --server-python "$PWD/.venv/bin/python" --config-dir ~/mcp-sdxl-configs \\
        --llm-url http://127.0.0.1:8000/v1 --query "Draw Luca waving on the beach, then give the GPU back"

Without --query it is a chat on the terminal. The tool results Qwen-Agent shows the model are the
JSON text blocks (image ids, prompt, LoRAs, seed, timings); images themselves stay on the server
(their paths are in the JSON; resources sdxl://images/{id}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Passed to the server explicitly: stdio children inherit only HOME, LOGNAME, PATH, SHELL, TERM, USER.
PASS_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES", "MCP_SDXL_HOME",
            "MCP_SDXL_MODELS", "MCP_SDXL_CONFIG", "MCP_SDXL_PROFILE", "PYTORCH_CUDA_ALLOC_CONF")

SYSTEM = """You make consistent 3D-animation character images with the sdxl tools.
Start with sdxl-list_characters and use only the names it returns. Images are referred to by id (img_...).
Never set run_as_job: you share the GPU with the image engine and sleep while it renders, so a call simply
returns when its images are ready.
When you are done drawing, call sdxl-release_gpu. Tell the user the image ids and file paths you got."""


def mcp_servers(args) -> dict:
    """The `mcpServers` entry Qwen-Agent's MCPManager starts (the same shape as Claude Desktop's)."""
    server_args = ["-m", "mcp_sdxl", "serve"]
    for flag, value in (("--config-dir", args.config_dir), ("--home", args.home), ("--profile", args.profile)):
        if value:
            server_args += [flag, str(value)]
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the local cache; nothing is downloaded
    return {"mcpServers": {"sdxl": {"command": args.server_python, "args": server_args, "env": env}}}


def first_model(llm_url: str) -> str:
    with urllib.request.urlopen(f"{llm_url.rstrip('/')}/models", timeout=10) as reply:
        return json.load(reply)["data"][0]["id"]


def build_assistant(args):
    from qwen_agent.agents import Assistant

    llm = {
        "model": args.model or first_model(args.llm_url),
        "model_server": args.llm_url,  # vLLM's OpenAI-compatible API
        "api_key": "EMPTY",
        "generate_cfg": {
            # Qwen-Agent writes the tools into the prompt and parses <tool_call> blocks itself, so vLLM
            # needs no --tool-call-parser. Qwen3: answer without a thinking block.
            "fncall_prompt_type": "nous",
            "extra_body": {"chat_template_kwargs": {"enable_thinking": False}},
        },
    }
    return Assistant(llm=llm, function_list=[mcp_servers(args)], system_message=SYSTEM, name="sdxl-artist")


def final_text(messages: list) -> str:
    return "\n".join(m["content"] for m in messages if m.get("role") == "assistant" and isinstance(m.get("content"), str)
                     and m["content"] and not m.get("function_call")).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-url", default=os.environ.get("VLLM_URL", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--model", default=os.environ.get("VLLM_MODEL"), help="default: the first of /v1/models")
    parser.add_argument("--server-python", default=str(REPO / ".venv" / "bin" / "python"),
                        help="absolute path of the Python that has mcp-sdxl installed")
    parser.add_argument("--config-dir", help="mcp-sdxl configs, with lease.yaml from this folder")
    parser.add_argument("--home", help="mcp-sdxl data folder (outputs, inputs, references)")
    parser.add_argument("--profile", choices=["auto", "sdxl", "tiny"])
    parser.add_argument("--query", help="one request, then exit (prints the answer)")
    parser.add_argument("--messages-out", help="write the whole conversation (tool calls and results) as JSON")
    args = parser.parse_args(argv)

    bot = build_assistant(args)
    messages: list = []
    while True:
        query = args.query if args.query is not None else input("you> ").strip()
        if not query:
            continue
        messages.append({"role": "user", "content": query})
        new = bot.run_nonstream(messages)
        messages.extend(new)
        for msg in new:
            if msg.get("function_call"):
                print(f"[tool] {msg['function_call']['name']} {msg['function_call']['arguments']}", file=sys.stderr)
        print(final_text(new), flush=True)
        if args.query is not None:
            break
    if args.messages_out:
        Path(args.messages_out).write_text(json.dumps(messages, indent=1, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
