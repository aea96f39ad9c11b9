"""Errors a tool caller can act on.

Every exception that reaches an MCP client should say what was wrong and what would work instead;
these classes mark the ones whose message is written for that reader.
"""


class UserInputError(ValueError):
    """Bad input from the caller (unknown name, bad path, value out of range). Message says what works."""


class NotFoundError(UserInputError):
    """A named thing (character, image id, file) does not exist. Message lists what does."""


class ConfigError(ValueError):
    """A configuration file is invalid. Message names the file, the key and the problem."""


class BusyError(RuntimeError):
    """The engine queue is full; message says how many calls are ahead."""


class CancelledError(RuntimeError):
    """Generation was cancelled cooperatively (client cancel or cancel_job)."""


class GpuLeaseError(RuntimeError):
    """The GPU could not be acquired or handed back (holder, LLM backend or VRAM problem)."""


def shown(value, limit: int = 80) -> str:
    """`value` as an error message quotes it: repr, cut to `limit` characters. A model that sent 100k
    characters must still get a message it can read (Claude Desktop drops results over 1 MiB)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
