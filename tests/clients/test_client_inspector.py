"""MCP Inspector CLI (npm @modelcontextprotocol/inspector, installed by scripts/setup_clients.sh) against
`mcp-sdxl serve`: over stdio (each CLI run starts its own server, as `npx ... --cli python -m mcp_sdxl
serve ...` does) and over streamable HTTP, where the whole flow calls every tool with --tool-arg k=v.

How the Inspector CLI (2.x) takes arguments, as exercised here:
  inspector --cli [options] --method tools/call --tool-name NAME --tool-arg k=v k2=v2 -- COMMAND ARGS...
  --tool-arg values are JSON-parsed when they parse (images=["img_1","a.png"], seed=7, run_as_job=true),
  else taken as strings; --tool-args-json '{"k": ...}' passes an object verbatim. Options must come
  before the server command (after `--`) or URL (--server-url): --tool-arg is variadic and swallows
  whatever follows it. Exit codes: 0 ok, 5 the tool returned isError, 1 usage or connection errors.
"""

from __future__ import annotations

import json
import sys

import pytest
from client_flow import SMALL, TOOLS, FlowError, Reply, run_flow
from client_procs import HTTP_TOKEN as TOKEN
from client_procs import claude_config_for, run, serve_args, server_env


def _tool_args(args: dict) -> list[str]:
    """--tool-arg k=v: strings raw, everything else as JSON (which the CLI parses back)."""
    pairs = []
    for key, value in args.items():
        if isinstance(value, str):
            try:
                json.loads(value)
            except ValueError:
                pairs.append(f"{key}={value}")
                continue
            raise AssertionError(f"{key}={value!r} would be JSON-parsed by the CLI: use --tool-args-json")
        pairs.append(f"{key}={json.dumps(value)}")
    return ["--tool-arg", *pairs] if pairs else []


class Inspector:
    def __init__(self, prefix: list[str], *, stdio: list[str] | None = None, url: str | None = None,
                 config: str | None = None, headers: list[str] = (), env: dict | None = None):
        self.prefix, self.stdio, self.url, self.headers, self.env = prefix, stdio, url, list(headers), env
        self.config = config

    def run(self, *options: str, timeout: float = 180):
        # the Inspector gives up connecting after 15 s by default; a server on a loaded 2-core machine takes ~11 s
        cmd = [*self.prefix, "--cli", "--format", "json", "--connect-timeout", "120000", *options]
        if self.url:
            cmd += ["--server-url", self.url, "--transport", "http"]
            for header in self.headers:
                cmd += ["--header", header]
        if self.config:  # an mcpServers file (Claude Desktop's format), server "sdxl"
            cmd += ["--config", self.config, "--server", "sdxl"]
        if self.stdio:  # the server's env: the Inspector's defaults (PATH, HOME, ...) plus -e
            cmd += ["-e", "HF_HUB_OFFLINE=1", "-e", "TOKENIZERS_PARALLELISM=false", "--", *self.stdio]
        proc = run(cmd, timeout=timeout, env=self.env)
        try:
            out = json.loads(proc.stdout) if proc.stdout.strip() else None
        except ValueError:
            out = None
        return proc, out

    def call(self, tool: str, args: dict) -> Reply:
        proc, out = self.run("--method", "tools/call", "--tool-name", tool, *_tool_args(args))
        if proc.returncode not in (0, 5) or not out or "result" not in out:
            raise FlowError(f"inspector tools/call {tool} {args}: exit {proc.returncode}\n"
                            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
        result = out["result"]
        assert (proc.returncode == 5) == bool(result.get("isError")), (proc.returncode, result)
        text = "\n\n".join(c["text"] for c in result["content"] if c["type"] == "text")
        return Reply(text=text, is_error=bool(result.get("isError")), raw=result)


def _inspector_env(home) -> dict:
    # The Inspector passes a stdio server only its default variables plus `-e` ones; it needs PATH itself.
    # HOME is the test's temporary folder, so the Inspector's ~/.mcp-inspector state stays in there.
    return {**server_env(home), "MCP_INSPECTOR_SECRET_STORE": "memory"}  # no OS keychain here; nothing written


def test_inspector_stdio_list_and_call(inspector, client_home, config_dir, tmp_path):
    """Each CLI run starts a server (~5 s of imports): two runs here, every tool over HTTP below.
    The first starts it from examples/claude_desktop/claude_desktop_config.json (the Inspector reads
    that format with --config), i.e. exactly as Claude Desktop would: command, args, only that env."""
    claude = claude_config_for(client_home, config_dir, tmp_path)
    from_claude = Inspector(inspector, config=str(claude), env=_inspector_env(client_home))
    proc, out = from_claude.run("--method", "tools/list", "--strict")
    assert proc.returncode == 0, f"tools/list --strict (schema portability) failed:\n{proc.stderr[-4000:]}"
    tools = {t["name"]: t for t in out["result"]["tools"]}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert len(tool["description"]) > 60 and tool["inputSchema"]["type"] == "object", tool["name"]
    assert tools["generate_character"]["inputSchema"]["required"] == ["character", "scene_description"]

    # The command form: inspector --cli [options] -- python -m mcp_sdxl serve ...
    cli = Inspector(inspector, stdio=[sys.executable, *serve_args(client_home, config_dir)],
                    env=_inspector_env(client_home))
    generated = cli.call("generate_character", {"character": "luca", "scene_description": "waving on the beach",
                                                "seed": 11, **SMALL})
    assert generated.is_error is False, generated.text
    data = json.loads(generated.text)
    assert data == generated.raw["structuredContent"]
    kinds = [c["type"] for c in generated.raw["content"]]
    assert kinds[0] == "text" and "image" in kinds and "resource_link" in kinds, kinds
    preview = next(c for c in generated.raw["content"] if c["type"] == "image")
    assert preview["mimeType"] in ("image/webp", "image/jpeg") and data["images"][0]["id"].startswith("img_")


def test_inspector_http_flow_calls_every_tool(inspector, shared_http_server, tmp_path):
    server = shared_http_server
    env = _inspector_env(tmp_path / "home")

    anonymous = Inspector(inspector, url=server.url, env=env)
    proc, _ = anonymous.run("--method", "tools/list", "--stored-auth-only", timeout=60)
    assert proc.returncode != 0, "the server must refuse a client without the bearer token"

    cli = Inspector(inspector, url=server.url, headers=[f"Authorization: Bearer {TOKEN}"], env=env)
    proc, out = cli.run("--method", "tools/list", "--strict")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {t["name"] for t in out["result"]["tools"]} == TOOLS

    # Every tool, list arguments as JSON arrays (images=[...]), tool errors as exit 5 (enroll without a
    # face, an unknown job id), jobs polled and cancelled across CLI runs (one server keeps them).
    try:
        report = run_flow(cli.call)
    except FlowError as exc:
        pytest.fail(f"{exc}\n--- server log ---\n{server.log()}")
    assert {s["tool"] for s in report["steps"]} == TOOLS

    # The whole argument object at once (no k=v coercion), and a resource read.
    proc, out = cli.run("--method", "tools/call", "--tool-name", "list_images", "--tool-args-json", '{"limit": 2}')
    assert proc.returncode == 0 and len(json.loads(out["result"]["content"][0]["text"])["images"]) == 2
    image_id = report["ids"]["generated"]
    proc, out = cli.run("--method", "resources/read", "--uri", f"sdxl://images/{image_id}/metadata")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out["result"]["contents"][0]["text"])["seed"] == 7
