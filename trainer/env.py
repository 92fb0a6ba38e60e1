"""Where the trainer's base comes from and where its adapters go: one serialisable record.

The server derives it from its own settings (`Settings.trainer_env`) and hands it to each
training worker as JSON in the environment; `hotpeft train` / `hotpeft eval` build it from their
flags and HOTPEFT_* variables. So a worker trains on the base the server serves and registers
where the server watches, and nobody copies these fields by hand.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hotpeft.adapters.paths import default_registry_url, default_store_dir
from hotpeft.model.source import DEFAULT_MODEL_ID

ENV_VAR = "HOTPEFT_TRAINER_ENV"  # a worker's record; never argv (a registry URL may hold a password)


@dataclass
class TrainerEnv:
    model: str = DEFAULT_MODEL_ID
    """Base model: the embedded default id, or a local HF model directory (the one the server serves)."""
    home: Path = field(default_factory=lambda: Path("~/.hotpeft").expanduser())
    """Home directory shared with the server (model cache, registry, adapter store)."""
    registry_url: str | None = None
    """SQLAlchemy URL of the registry (default: the home's registry.db)."""
    store_dir: Path | None = None
    """Adapter store (default: <home>/store)."""
    store_url: str | None = None
    """fsspec URL of a shared adapter store (the server's --store-url)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int | None = None
    """CPU threads (default: all cores)."""
    max_lora_rank: int = 64
    """Largest LoRA rank the servers accept."""
    allow_foreign_base: bool = False
    """Register adapters whose config names another base model (as the server's flag)."""

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser()
        if self.store_dir is not None:
            self.store_dir = Path(self.store_dir).expanduser()

    @property
    def registry(self) -> str:
        return self.registry_url or default_registry_url(self.home)

    @property
    def store(self) -> Path:
        return self.store_dir or default_store_dir(self.home)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> TrainerEnv:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})
