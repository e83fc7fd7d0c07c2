"""JSON documents from users and clients, parsed within bounds.

``snapshot.json`` and ``snapfs serve``'s request bodies are small objects: a
document too large or nested too deeply is refused (InvalidArgument: EINVAL,
HTTP 400) instead of exhausting memory or the stack (a RecursionError was an
EIO with a traceback before).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidArgument

#: Deepest nesting of arrays and objects accepted; a snapshot object needs 2.
MAX_DEPTH = 32


def _depth(value: Any) -> int:
    """Nesting depth of a parsed document, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def loads(data: bytes | str, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """``data`` parsed as JSON, or InvalidArgument(``what``) saying why not."""
    if len(data) > max_bytes:
        raise InvalidArgument(what, f"larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except UnicodeDecodeError:
        raise InvalidArgument(what, "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(what, f"not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(what, f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InvalidArgument(what, f"not acceptable JSON: {exc}") from None
    if _depth(value) > max_depth:
        raise InvalidArgument(what, f"nested deeper than {max_depth} levels")
    return value
