"""Streamable HTTP at /mcp (uvicorn), loopback by default, with an optional bearer token."""

from __future__ import annotations

import hmac
import logging

log = logging.getLogger(__name__)


class BearerTokenMiddleware:
    """Reject requests without `Authorization: Bearer <token>` (plain ASGI, so streaming is untouched)."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            # the scheme name is case-insensitive (RFC 7235); the token is compared in constant time
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": b"missing or wrong bearer token\n"})
                return
        await self.app(scope, receive, send)


def build_http_app(server, host: str, token: str | None = None):
    app = server.streamable_http_app(host=host)
    return BearerTokenMiddleware(app, token) if token else app


def run_http(server, host: str, port: int, token: str | None = None) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving on %s without a token: anyone who can reach this address can use the GPU", host)
    uvicorn.run(build_http_app(server, host, token), host=host, port=port, log_level="warning")
