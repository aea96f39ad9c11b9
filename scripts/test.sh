#!/usr/bin/env bash
# Set up .venv/ (and the separate client runtimes) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f scripts/setup_clients.sh ]; then
  bash scripts/setup_clients.sh || echo "warning: client runtimes could not be installed; their tests will say so" >&2
fi
# Headless Chromium renders the demo gallery in a test (Debian package; root on CI machines).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium not installed" >&2
fi
export HF_HUB_OFFLINE=1
# Two workers, one BLAS/OpenMP thread each: many tests wait on server subprocesses and clients, so two
# workers overlap that waiting; more threads than cores made the tiny CPU models much slower (measured:
# 628 s with one worker and default threads, about 410 s like this, on 2 cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pytest() { .venv/bin/python -m pytest -q "$@"; }
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist load "$@"
fi
# The real-client tests (Qwen-Agent, Inspector, HTTP SDK client) start servers under the clients' own
# time limits: they run on a machine no other test is loading, after the rest.
pytest -n "${PYTEST_WORKERS:-2}" --dist load --ignore=tests/clients
pytest tests/clients
