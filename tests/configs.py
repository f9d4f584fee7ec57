"""Test shorthand for `Settings`: `make_settings(max_wait=5, api_keys=("k",))`.

A name is a setting's field name (when no other group has it) or its flag without dashes
(`upstream_timeout` for `--upstream-timeout`). An unknown name is a TypeError, as a typo in a
real keyword argument would be.
"""

from __future__ import annotations

from typing import Any

from vllm_chill.settings import OPTIONS, Settings
from vllm_chill.settings._parse import assemble

_NAMES: dict[str, str] = {}
for _option in OPTIONS:
    _NAMES[_option.flag.removeprefix("--").replace("-", "_")] = _option.dest
_FIELDS = [o.name for o in OPTIONS]
for _option in OPTIONS:
    if _FIELDS.count(_option.name) == 1:
        _NAMES.setdefault(_option.name, _option.dest)


def make_settings(**fields: Any) -> Settings:
    values = {}
    for name, value in fields.items():
        dest = _NAMES.get(name)
        if dest is None:
            raise TypeError(f"no setting is called {name!r}")
        values[dest] = value
    return assemble(values, ())
