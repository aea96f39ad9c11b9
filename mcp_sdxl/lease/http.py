"""Tiny JSON-over-HTTP helper (stdlib urllib) with a timeout on every call."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


class BackendError(RuntimeError):
    """The LLM server could not be reached or refused a request. Message names backend and URL."""


def call(backend: str, method: str, url: str, body: dict | None = None, *, timeout: float, hint: str = "") -> object:
    """Send one request; return the decoded JSON reply (or text, or None when empty).

    Any failure (refused, timed out, HTTP status >= 400) becomes BackendError naming the backend,
    the method and the URL, plus `hint` for 404 (usually: the server was started without the
    feature that adds this endpoint).
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace").strip()
        extra = f" ({hint})" if hint and exc.code == 404 else ""
        raise BackendError(f"LLM backend {backend}: {method} {url} answered HTTP {exc.code}{extra}: {detail}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BackendError(f"LLM backend {backend} unreachable: {method} {url}: {reason}") from exc
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
