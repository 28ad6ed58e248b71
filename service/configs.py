"""Strict parsing of a training config, the one rule every hop that takes a config from outside
applies (the API's job body, a study's sampled configs): no type coercion (`"epochs": "3"`,
`true` for a number and a number for a string are errors, as the published schema says), and a
number without a fractional part counts as an integer, as in JSON Schema.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel

__all__ = ["integral", "parse_strict"]

M = TypeVar("M", bound=BaseModel)


def integral(value: Any) -> Any:
    """JSON numbers without a fractional part as ints (JSON Schema counts 3.0 as an integer)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def parse_strict(model: type[M], data: Any) -> M:
    """`data` (parsed JSON) as `model`, strictly; raises pydantic's `ValidationError`."""
    return model.model_validate_json(json.dumps(integral(data)), strict=True)
