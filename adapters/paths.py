"""Where a home directory keeps the registry and the store, and a check that paths derived from
names stay inside their root (after resolving symlinks).

Names are validated before they reach a path, and ids are made by us; this is the second
line, at the place where a path is built, for whatever slipped past the first (a shared
registry row, a renamed folder, a symlink planted in the home).
"""
from __future__ import annotations

from pathlib import Path


class UnsafePath(ValueError):
    """A derived path would leave its root."""


def inside(root: Path, *parts: str) -> Path:
    """`root / parts...`, refused unless it resolves (symlinks followed) to a place under `root`."""
    base = Path(root).resolve()
    for part in parts:
        if not part or "\0" in part or Path(part).is_absolute():
            raise UnsafePath(f"refusing the path component {part!r} under {root}")
    candidate = base.joinpath(*parts).resolve()
    if candidate != base and base not in candidate.parents:
        raise UnsafePath(f"{'/'.join(parts)!r} leaves {root} (resolves outside it)")
    return candidate


def default_registry_url(home: Path) -> str:
    """The registry of a home directory when no --registry-url is given."""
    return f"sqlite:///{Path(home) / 'registry.db'}"


def default_store_dir(home: Path) -> Path:
    """The adapter store of a home directory when no --store-dir is given."""
    return Path(home) / "store"
