"""A remote client in its own process: the official SDK's Client (mcp 2.x) over streamable HTTP runs the
shared flow against `mcp-sdxl serve --http`, plus what only a full client sees: progress notifications,
inline image previews, resource reads, result sizes.

    python sdk_http_driver.py URL TOKEN REPORT.json     (TOKEN may be "-" for none)
"""

from __future__ import annotations

import base64
import json
import sys
import traceback
from pathlib import Path

from anyio.from_thread import start_blocking_portal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_flow import SMALL, Reply, run_flow

CLAUDE_DESKTOP_LIMIT = 1_048_576


def connect(url: str, token: str | None):
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"} if token else None,
                              timeout=httpx2.Timeout(60, read=300))
    return http, Client(streamable_http_client(url, http_client=http))


def wire_size(result) -> int:
    body = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    return len(json.dumps({"jsonrpc": "2.0", "id": 1, "result": body}).encode())


def main(url: str, token: str, report_path: str) -> int:
    token = None if token == "-" else token
    report: dict = {"sizes": {}}
    status = 1
    try:
        with start_blocking_portal() as portal:
            http, client = connect(url, token)
            with portal.wrap_async_context_manager(http), portal.wrap_async_context_manager(client):
                tools = portal.call(client.list_tools)
                report["tools"] = sorted(t.name for t in tools.tools)

                def call(tool: str, args: dict) -> Reply:
                    result = portal.call(client.call_tool, tool, args)
                    size = wire_size(result)
                    report["sizes"][tool] = max(size, report["sizes"].get(tool, 0))
                    text = "\n\n".join(c.text for c in result.content if c.type == "text")
                    return Reply(text=text, is_error=result.is_error, raw=result)

                report["flow"] = run_flow(call)

                progress: list[tuple[float, float | None, str | None]] = []

                async def on_progress(done, total, message):
                    progress.append((done, total, message))

                result = portal.call(lambda: client.call_tool(
                    "generate_character",
                    {"character": "alberto", "scene_description": "progress", "seed": 12, **SMALL, "steps": 6},
                    progress_callback=on_progress))
                assert not result.is_error, result.content[0].text
                report["progress"] = progress
                report["content_types"] = [c.type for c in result.content]
                preview = next(c for c in result.content if c.type == "image")
                report["preview"] = {"mime": preview.mime_type, "bytes": len(base64.b64decode(preview.data))}
                link = next(c for c in result.content if c.type == "resource_link")
                png = portal.call(client.read_resource, str(link.uri)).contents[0]
                report["png_magic"] = base64.b64decode(png.blob)[:8].hex()
        status = 0
    except BaseException:  # noqa: BLE001 - carried to the test in the report
        report["error"] = traceback.format_exc()
    Path(report_path).write_text(json.dumps(report, indent=1, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
