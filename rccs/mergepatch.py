"""JSON merge patch (RFC 7396) and the JSON text rules of state documents, shared by the server, its stores
and the client.

``merge_patch(target, patch)``: a patch that is not an object replaces the target whole (``null``
deletes the document); an object patch is applied member by member: ``null`` removes a member, an
object is merged into the member recursively, anything else (arrays included) replaces it whole.
Neither argument is changed; the result shares no mutable part with them.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

MAX_INT = 2**64
MIN_INT = -(2**63)


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: equal documents give equal text (``1`` and ``1.0`` and ``true`` differ)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True)


def json_size(value: Any) -> int:
    """What a document costs against the limits: its compact JSON in UTF-8 bytes (0 for a deleted one)."""
    if value is None:
        return 0
    return len(canonical_json(value).encode("utf-8"))


def json_problem(value: Any, max_depth: int = 64) -> str | None:
    """Why ``value`` is not a plain JSON value a state document may hold (None if it is): string keys only,
    finite floats, integers in the 64-bit range, no binary or extension values."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels"
        if item is None or isinstance(item, bool | str):
            continue
        if isinstance(item, int):
            if not MIN_INT <= item < MAX_INT:
                return "an integer outside the 64-bit range"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "a number that is not finite"
        elif isinstance(item, list):
            stack.extend((member, depth + 1) for member in item)
        elif isinstance(item, dict):
            for key, member in item.items():
                if not isinstance(key, str):
                    return "an object key that is not a string"
                stack.append((member, depth + 1))
        else:
            return f"a value of type {type(item).__name__} (not JSON)"
    return None
