"""The SDK's stdio transport with two repairs: lines it cannot read are answered, and a line whose only
fault is a lone UTF-16 surrogate is read.

A JavaScript client that cuts a model's text inside an emoji sends a lone surrogate escape ("\\ud83d")
in a JSON string. That is valid JSON, but the SDK's strict parser rejects the line and answers nothing,
so the client waits for its timeout. Here such a line is parsed leniently, each lone surrogate becomes
U+FFFD, and the message goes on as if it had been sent that way. Any other line the SDK cannot read (not
JSON, nested too deep, not a JSON-RPC message) gets a JSON-RPC error with id null, as the HTTP transport
answers, instead of silence (or, for a line nested 1,000 deep, a RecursionError that ended the server).
"""

from __future__ import annotations

import json
import logging

import anyio
from mcp import types
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

log = logging.getLogger(__name__)


def replace_lone_surrogates(value):
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [replace_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {replace_lone_surrogates(k): replace_lone_surrogates(v) for k, v in value.items()}
    return value


def repaired(item):
    """`item` from the SDK's stdin reader (a SessionMessage, or the exception a line raised), repaired."""
    if not isinstance(item, ValidationError):
        return item
    errors = item.errors()
    raw = errors[0].get("input") if errors and errors[0].get("type") == "json_invalid" else None
    if not isinstance(raw, str):
        return item
    try:
        data = json.loads(raw)  # Python's parser takes lone surrogates
        fixed = replace_lone_surrogates(data)
    except (ValueError, RecursionError):
        return item  # not JSON at all, or nested too deep to read
    if fixed == data:
        return item
    try:
        message = types.jsonrpc_message_adapter.validate_json(json.dumps(fixed), by_name=False)
    except ValidationError:
        return item
    log.warning("stdin: a message with lone UTF-16 surrogates; each was replaced with U+FFFD")
    return SessionMessage(message)


def unreadable_reply(exc: Exception) -> SessionMessage:
    """The JSON-RPC error for a line that could not be read (id null: its id could not be read either)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else []
    if errors and errors[0].get("type") == "json_invalid":
        code, what = types.PARSE_ERROR, f"Parse error: the line is not JSON ({errors[0].get('msg', '')[:120]})"
    else:
        code, what = types.INVALID_REQUEST, "Invalid request: the line is JSON but not a JSON-RPC 2.0 message"
    return SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=None, error=types.ErrorData(code=code, message=what)))


class RepairedReadStream:
    """The SDK's receive stream, each item passed through `repaired`; what stays unreadable is answered
    through `reply` (the write stream) and not passed on."""

    def __init__(self, inner, reply=None):
        self._inner = inner
        self._reply = reply

    async def receive(self):
        while True:
            item = repaired(await self._inner.receive())
            if not isinstance(item, Exception) or self._reply is None:
                return item
            log.warning("stdin: a line that is not a JSON-RPC message was answered with an error")
            await self._reply(unreadable_reply(item))

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._inner.close()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self):
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc):
        return await self._inner.__aexit__(*exc)


async def run_stdio(server) -> None:
    """MCPServer.run_stdio_async with the repaired read stream."""
    lowlevel = server._lowlevel_server
    async with stdio_server() as (read_stream, write_stream):
        await lowlevel.run(RepairedReadStream(read_stream, reply=write_stream.send), write_stream,
                           lowlevel.create_initialization_options())
