"""Adapter names and `name@N` references."""
from __future__ import annotations

import re
from dataclasses import dataclass

from hotpeft.adapters.errors import InvalidName

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
BASE_ALIAS = "base"


def validate_name(name: str, *, param: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid adapter name {name!r}: names are 1-64 characters of [a-z0-9._-], "
            "starting with a letter or digit, without '..'",
            param=param,
        )
    return name


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None  # None: the active version


def parse_model_ref(model: str, *, param: str = "model") -> ModelRef:
    """`name` or `name@N` (N >= 1). Raises InvalidName for anything else."""
    name, sep, version = model.partition("@")
    if sep:
        if not version.isdigit() or int(version) < 1:
            raise InvalidName(f"invalid version in {model!r}: use name@N with N a positive integer", param=param)
        return ModelRef(validate_name(name, param=param), int(version))
    return ModelRef(validate_name(name, param=param), None)
