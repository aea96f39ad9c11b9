"""Keep native libraries' routine log lines out of the server's stderr.

MediaPipe's C++ graph (absl INFO and WARNING lines, TFLite) writes straight to file descriptor 2 as it builds and runs:
"Created TensorFlow Lite XNNPACK delegate", "All log messages before absl::InitializeLog()", one
"Feedback manager requires a model with a single signature" line per model per image. No Python setting
reaches them (GLOG_minloglevel is for glog, which MediaPipe no longer uses). So while such a call runs,
descriptor 2 points at a temporary file; afterwards every line that is not one of these goes to the real
stderr. Our own log lines written meanwhile by other threads are delayed, not lost.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading

ROUTINE = re.compile(
    r"^(?:[IW]\d{4} [\d:. ]+\d+ \S+\.cc:\d+\]"  # absl INFO / WARNING lines: I0000 00:00:... file.cc:123]
    r"|INFO: Created TensorFlow Lite \w+ delegate"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR)"
)
_lock = threading.Lock()


@contextlib.contextmanager
def routine_native_logs_dropped():
    """Run the block with descriptor 2 captured; pass on what is not routine chatter."""
    with _lock, tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not ROUTINE.match(line)]
            if kept:
                os.write(2, "".join(kept).encode())
