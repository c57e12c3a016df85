"""Layered settings as plain data: a preset, a method's shared and own preset files, --set overrides.

Both the run configuration (privbench.config) and the method registry (privbench.methods) stack
layers this way; it lives apart from both so that neither imports the other for it.
"""

from __future__ import annotations

import copy
from typing import Any


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it, key by key; nested mappings merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
