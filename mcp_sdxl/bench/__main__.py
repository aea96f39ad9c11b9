"""`python -m mcp_sdxl.bench --child SPEC`: one cold-start measurement in a fresh process."""

import logging
import sys

from mcp_sdxl.bench.engine_runs import _child

if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        sys.exit(_child(sys.argv[2]))
    print("use: mcp-sdxl bench (see --help)", file=sys.stderr)
    sys.exit(2)

