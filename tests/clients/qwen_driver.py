"""Drive `mcp-sdxl serve` through Qwen-Agent's own MCP client (MCPManager), LLM-free.

Runs under .venv-qwen/bin/python (qwen-agent + mcp<2), never under the project's .venv:
    python qwen_driver.py CONFIG.json REPORT.json
CONFIG.json is what a Qwen-Agent user writes: {"mcpServers": {"sdxl": {"command", "args", "env"}}}.
REPORT.json gets the tools as Qwen-Agent registered them (name, description, reduced parameters),
the flow's report (client_flow.py) and what Qwen-Agent's resource tools return. Exit 1 on failure.
"""

from __future__ import annotations

import json
import sys
import traceback
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_flow import Reply, run_flow


def main(config_path: str, report_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
    (server_name,) = config["mcpServers"]
    report: dict = {"qwen_agent": version("qwen-agent"), "mcp": version("mcp")}
    from qwen_agent.tools.mcp_manager import MCPManager

    manager = MCPManager()
    status = 1
    try:
        tools = manager.initConfig(config)
        by_name = {tool.name: tool for tool in tools}
        report["tools"] = {t.name: {"description": t.description, "parameters": t.parameters} for t in tools}
        # The exact schema the LLM gets (BaseTool.function), to show nothing is lost on the way.
        report["functions"] = [t.function for t in tools]

        def call(tool: str, args: dict) -> Reply:
            # What Qwen-Agent does with an LLM's function call: a JSON string in, text out.
            text = by_name[f"{server_name}-{tool}"].call(json.dumps(args))
            return Reply(text=text, is_error=None)

        report["flow"] = run_flow(call)
        image_id = report["flow"]["ids"]["generated"]
        read = by_name[f"{server_name}-read_resource"]
        report["resources"] = {
            "list": by_name[f"{server_name}-list_resources"].call("{}"),
            "metadata": read.call(json.dumps({"uri": f"sdxl://images/{image_id}/metadata"})),
            "png": read.call(json.dumps({"uri": f"sdxl://images/{image_id}"})),
            "characters": read.call(json.dumps({"uri": "sdxl://characters"})),
        }
        status = 0
    except BaseException:  # noqa: BLE001 - the report carries it to the test
        report["error"] = traceback.format_exc()
    finally:
        try:
            manager.shutdown()
        except Exception:  # noqa: BLE001
            report.setdefault("shutdown_error", traceback.format_exc())
        Path(report_path).write_text(json.dumps(report, indent=1, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
