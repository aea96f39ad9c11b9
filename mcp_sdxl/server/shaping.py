"""Tool results for real clients: JSON text + inline preview(s) + resource links, under a byte budget.

Claude Desktop rejects results over 1 MiB and renders only plain ImageContent; Qwen-Agent forwards
only text blocks. So every result carries its full JSON as text, the best image as an inline
preview, smaller previews for the next ones while the budget lasts, and a resource link for every
image.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from mcp.types import CallToolResult, ImageContent, ResourceLink, TextContent
from PIL import Image
from pydantic import BaseModel

from mcp_sdxl.store import encode_preview

log = logging.getLogger(__name__)

SECONDARY_PREVIEW_PX = 256
MAX_PREVIEWS = 4


def json_text(data: BaseModel | dict) -> str:
    """The same JSON as structuredContent, for clients that read only text blocks."""
    return json.dumps(structured(data), indent=1, default=str)


def structured(data: BaseModel | dict) -> dict[str, Any]:
    return data.model_dump(mode="json") if isinstance(data, BaseModel) else json.loads(json.dumps(data, default=str))


def image_result(data: BaseModel, images: list[dict], max_px: int, max_bytes: int) -> CallToolResult:
    """`images`: [{"id", "uri", "path"}] best first. Previews are added while the budget allows."""
    text = json_text(data)
    content: list[Any] = [TextContent(type="text", text=text)]
    # Structured content is sent too: budget for the JSON twice, plus link overhead.
    budget = max_bytes - 2 * len(text.encode()) - 400 * len(images) - 2_000
    for n, info in enumerate(images[:MAX_PREVIEWS]):
        px = max_px if n == 0 else min(max_px, SECONDARY_PREVIEW_PX)
        allowance = int(budget * 3 / 4) - 200  # base64 grows data by 4/3
        if allowance < 4_000:
            break
        try:
            with Image.open(info["path"]) as img:
                data_bytes, mime = encode_preview(img, px, allowance)
        except OSError:
            log.warning("no preview for %s", info["path"], exc_info=True)
            continue
        encoded = base64.b64encode(data_bytes).decode()
        budget -= len(encoded) + 200
        content.append(ImageContent(type="image", data=encoded, mime_type=mime))
    for info in images:
        content.append(ResourceLink(
            type="resource_link", uri=info["uri"], name=info["id"], mime_type="image/png",
            description=info.get("description"),
        ))
    result = CallToolResult(content=content, structured_content=structured(data))
    # The estimate above ignores JSON escaping and framing: measure, and drop the smallest previews
    # (the last ones) until the serialized result fits. Text and links always stay.
    while wire_bytes(result) > max_bytes and any(c.type == "image" for c in result.content):
        last = max(i for i, c in enumerate(result.content) if c.type == "image")
        del result.content[last]
    return result


def wire_bytes(result: CallToolResult) -> int:
    """Bytes of `result` as it goes on the wire inside a JSON-RPC response (plus ~100 for the envelope)."""
    return len(result.model_dump_json(by_alias=True, exclude_none=True).encode()) + 100


def data_result(data: BaseModel | dict) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=json_text(data))], structured_content=structured(data))


def inline_refs(schema: dict) -> dict:
    """Replace every $ref with its definition, so clients that drop `$defs` lose nothing."""
    defs = schema.get("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                target = defs[node["$ref"].split("/")[-1]]
                merged = {**resolve(target), **{k: resolve(v) for k, v in node.items() if k != "$ref"}}
                return merged
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


# Names models bring from diffusers and other image APIs, and ours.
ARGUMENT_SYNONYMS = {
    "prompt": "scene_description", "scene": "scene_description", "description": "scene_description",
    "num_images": "num_candidates", "n": "num_candidates", "count": "num_candidates", "batch_size": "num_candidates",
    "num_inference_steps": "steps", "guidance_scale": "cfg_scale", "cfg": "cfg_scale", "negative": "negative_prompt",
}


def unknown_arguments(unknown: list[str], known: list[str]) -> str:
    """Argument names a tool does not take, with the closest real ones and the whole list."""
    import difflib

    parts = []
    for name in unknown[:MAX_LISTED]:
        shown = repr(name if len(name) <= 40 else name[:37] + "...")
        close = [ARGUMENT_SYNONYMS[name]] if ARGUMENT_SYNONYMS.get(name) in known else []
        close = close or difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"{shown} (did you mean {close[0]!r}?)" if close else shown)
    parts += _more(len(unknown))
    return f"unknown argument(s) {', '.join(parts)}; this tool takes: {', '.join(known) or 'no arguments'}"


# One clause per problem, for the first few: 100,000 bad list items made a 5.4 MB error message.
MAX_LISTED = 10


def _more(total: int) -> list[str]:
    return [f"and {total - MAX_LISTED} more"] if total > MAX_LISTED else []


def argument_errors(error) -> str:
    """A pydantic ValidationError of a tool's arguments as one short clause per field, with the value
    that was sent: what the model needs to correct the call (not pydantic's multi-line text and links)."""
    parts = []
    errors = error.errors()
    for item in errors[:MAX_LISTED]:
        field = ".".join(str(p) for p in item.get("loc", ())) or "arguments"
        text = f"{field}: {item.get('msg', 'invalid')}"
        if item.get("type") != "missing":
            sent = repr(item.get("input"))
            text += f" (got {sent if len(sent) <= 80 else sent[:77] + '...'})"
        parts.append(text if len(text) <= 300 else text[:297] + "...")
    return "invalid arguments: " + "; ".join(parts + _more(len(errors)))

