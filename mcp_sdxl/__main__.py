import sys

from mcp_sdxl.cli import main

sys.exit(main())
