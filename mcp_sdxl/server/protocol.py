"""How the MCP SDK's answers are reshaped for a model: every failure a tool error or an MCP error whose
text says what would work, never a bare "Internal server error" or an echoed megabyte of input.

`tool_errors` / `resource_errors` wrap the functions build_server registers; StudioServer overrides the
SDK server's dispatch (unknown tools, unknown arguments, argument validation, unknown resources and
prompts, missing prompt arguments). No torch here.
"""

import functools
import inspect
import logging

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import (
    ResourceError,
    ResourceNotFoundError,
    ToolError,
    UnexpectedResourceError,
    UnexpectedToolError,
)
from mcp.shared.exceptions import MCPError
from mcp.types import INTERNAL_ERROR, INVALID_PARAMS
from pydantic import ValidationError

from mcp_sdxl.errors import BusyError, CancelledError, ConfigError, GpuLeaseError, NotFoundError, UserInputError, shown
from mcp_sdxl.server import shaping

log = logging.getLogger(__name__)

MAX_PROMPT_ARGUMENT = 2000  # characters in one prompt-template argument


def tool_errors(fn):
    """Turn every failure into a ToolError whose text the model can act on."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except ToolError:
            raise
        except (UserInputError, BusyError, CancelledError, ConfigError, GpuLeaseError) as exc:
            raise ToolError(capped(str(exc))) from exc
        except Exception as exc:
            log.exception("tool %s failed", fn.__name__)
            raise ToolError(capped(f"{type(exc).__name__}: {exc}")) from exc

    wrapper.__signature__ = inspect.signature(fn)
    return wrapper


def capped(message: str, limit: int = 4000) -> str:
    """Every message quotes the caller's values cut short (errors.shown); this is the last guard."""
    return message if len(message) <= limit else message[: limit - 20] + " ... (message cut)"


def resource_errors(fn):
    """A bad or unknown image id is the reader's mistake: say so (the SDK would only name the URI)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NotFoundError as exc:
            raise ResourceNotFoundError(str(exc)) from exc
        except (UserInputError, OSError) as exc:
            raise ResourceError(str(exc)) from exc

    wrapper.__signature__ = inspect.signature(fn)
    return wrapper


class StudioServer(MCPServer):
    """MCPServer whose argument-validation errors read as one short clause per field."""

    async def call_tool(self, name, arguments, context=None):
        tool = self._tool_manager.get_tool(name)
        if tool is None:
            known = ", ".join(t.name for t in self._tool_manager.list_tools())
            raise ToolError(f"unknown tool {shown(name)}; tools: {known}")
        if isinstance(arguments, dict):
            # pydantic would drop them silently: `prompt` for `scene_description`, `num_images` for
            # `num_candidates` would give an image the model did not ask for
            known = tool.parameters.get("properties", {})
            unknown = [k for k in arguments if k not in known]
            if unknown:
                raise ToolError(f"Error executing tool {name}: {shaping.unknown_arguments(unknown, list(known))}")
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            cause = exc.__cause__
            if not isinstance(exc, UnexpectedToolError) and isinstance(cause, ValidationError):
                # still caused by the ValidationError: the SDK logs the rejected field names only
                raise ToolError(f"Error executing tool {name}: {shaping.argument_errors(cause)}") from cause
            raise

    async def run_stdio_async(self) -> None:
        from mcp_sdxl.server.stdio import run_stdio

        await run_stdio(self)

    async def read_resource(self, uri, context=None):
        try:
            return await super().read_resource(uri, context)
        except ResourceError as exc:
            if isinstance(exc, UnexpectedResourceError):
                raise  # a crash: the SDK logs it and names only the URI
            # the SDK would echo the whole URI back (message and data) and, for an unknown one, name
            # nothing that exists
            message = str(exc)
            if isinstance(exc, ResourceNotFoundError) and message.startswith("Unknown resource"):
                known = [str(r.uri) for r in self._resource_manager.list_resources()]
                known += [t.uri_template for t in self._resource_manager.list_templates()]
                message = f"unknown resource {shown(str(uri))}; resources: {', '.join(known)}"
            code = INVALID_PARAMS if isinstance(exc, ResourceNotFoundError) else INTERNAL_ERROR
            raise MCPError(code, capped(message, 2000), data={"uri": shown(str(uri), 200)}) from exc

    async def get_prompt(self, name, arguments=None, context=None):
        # The SDK answers an unknown prompt or a missing argument with "Internal server error" only.
        prompt = self._prompt_manager.get_prompt(name)
        if prompt is None:
            known = ", ".join(p.name for p in self._prompt_manager.list_prompts())
            raise MCPError(INVALID_PARAMS, f"unknown prompt {str(name)[:80]!r}; prompts: {known}")
        accepted = {a.name for a in prompt.arguments or []}
        unknown = [k for k in (arguments or {}) if k not in accepted]
        if unknown:
            wanted = ", ".join(f"{a.name} ({'required' if a.required else 'optional'})" for a in prompt.arguments or [])
            raise MCPError(INVALID_PARAMS, f"prompt {shown(name)} takes no argument {', '.join(shown(k, 40) for k in unknown[:5])}; "
                                           f"arguments: {wanted or 'none'}")
        long = [k for k, v in (arguments or {}).items() if isinstance(v, str) and len(v) > MAX_PROMPT_ARGUMENT]
        if long:  # a 100,000-character argument came back as a 201 kB prompt
            raise MCPError(INVALID_PARAMS, f"prompt {shown(name)}: {', '.join(shown(k, 40) for k in long[:5])} "
                                           f"longer than {MAX_PROMPT_ARGUMENT} characters; shorten it")
        given = {k for k, v in (arguments or {}).items() if v not in (None, "")}
        missing = [a.name for a in prompt.arguments or [] if a.required and a.name not in given]
        if missing:
            wanted = ", ".join(f"{a.name} ({'required' if a.required else 'optional'})" for a in prompt.arguments)
            raise MCPError(INVALID_PARAMS, f"prompt {shown(name)} needs {', '.join(map(repr, missing))}; arguments: {wanted}")
        return await super().get_prompt(name, arguments, context)
