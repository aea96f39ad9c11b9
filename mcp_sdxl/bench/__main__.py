"""`python -m mcp_sdxl.bench --child SPEC`: one cold-start measurement in a fresh process."""

import logging
import os
import sys

from mcp_sdxl.bench.engine_runs import _child

if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        code = _child(sys.argv[2])
        sys.stdout.flush()
        sys.stderr.flush()
        # A background compile may still be running (the child stops waiting for it in time to report):
        # interpreter teardown under that thread aborted the child (H200: "terminate called without an
        # active exception", exit -6) after it had printed its result. End here instead.
        os._exit(code)
    print("use: mcp-sdxl bench (see --help)", file=sys.stderr)
    sys.exit(2)
