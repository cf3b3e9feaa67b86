"""Applies a structural schema's ``default`` values to an object, as the API server does on
admission: used to check examples and the operator's Python defaults against the CRD."""

from __future__ import annotations

import copy
from typing import Any


def apply_defaults(node: dict, value: Any) -> Any:
    if node.get("type") == "object" and isinstance(value, dict):
        for key, sub in (node.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    return value
