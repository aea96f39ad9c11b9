"""Use mcp-sdxl from another process over streamable HTTP, with the official MCP Python SDK (mcp 2.x).

Start the server (loopback; a token is required by anything that is not loopback-only):
    mcp-sdxl serve --http 127.0.0.1:8765 --token "$MCP_SDXL_TOKEN"
Then:
    python examples/http_client.py --url http://127.0.0.1:8765/mcp --token "$MCP_SDXL_TOKEN" \\
        --character luca --scene "waving on the beach" --out ./pictures

It lists the tools, generates one image (printing the progress notifications), saves the full PNG
read from its resource link, and gives the GPU back to the local LLM.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def run(args) -> int:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    # Generations can take minutes on a real GPU: a long read timeout; long ones become jobs anyway.
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=600)) as http:
        async with Client(streamable_http_client(args.url, http_client=http)) as client:
            tools = await client.list_tools()
            print("tools:", ", ".join(t.name for t in tools.tools))

            async def progress(done: float, total: float | None, message: str | None) -> None:
                print(f"  progress {done:g}/{total or '?'} {message or ''}", file=sys.stderr)

            arguments = {"character": args.character, "scene_description": args.scene}
            if args.size:
                arguments.update(width=args.size, height=args.size)
            if args.steps:
                arguments["steps"] = args.steps
            result = await client.call_tool("generate_character", arguments, progress_callback=progress)
            if result.is_error:
                print("error:", result.content[0].text, file=sys.stderr)
                return 1
            data = result.structured_content
            if data.get("job_id") and data.get("status") != "done":
                print(f"running as job {data['job_id']}: poll get_job", file=sys.stderr)
                while data.get("state", data.get("status")) not in ("done", "failed", "cancelled"):
                    await anyio.sleep(2)
                    data = (await client.call_tool("get_job", {"job_id": data["job_id"]})).structured_content
                data = data.get("result") or data
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for image in data.get("images", []):
                blob = (await client.read_resource(image["uri"])).contents[0].blob
                path = out / f"{image['id']}.png"
                path.write_bytes(base64.b64decode(blob))
                print(f"{image['id']}  seed {image['seed']}  -> {path}")
            print("prompt:", data.get("prompt"))
            released = await client.call_tool("release_gpu", {})
            print("GPU released:", released.structured_content["lease"].get("released"))
    return 0


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8765/mcp")
    parser.add_argument("--token", default=os.environ.get("MCP_SDXL_TOKEN"))
    parser.add_argument("--character", default="luca")
    parser.add_argument("--scene", default="waving at the camera")
    parser.add_argument("--size", type=int, help="width = height in pixels (default: the preset's)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--out", default="pictures")
    args = parser.parse_args()
    try:
        return anyio.run(run, args)
    except Exception as exc:  # noqa: BLE001 - a message, not a traceback, for a wrong URL or token
        reasons = "; ".join(f"{type(e).__name__}: {e}" for e in leaves(exc))
        print(f"error: cannot use {args.url}: {reasons}\n(is the server running? a missing or wrong --token "
              "gets HTTP 401)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
