"""A base model's fingerprint: its id plus a hash of its config and weights.

Adapters record the fingerprint of the base they were registered against; a server on another
base (or on other weights under the same id) sees the difference.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FINGERPRINT_FILE = "hotpeft-fingerprint.json"


def _hash_model_dir(directory: Path, model_id: str, *, full: bool) -> str:
    """Model id + config + weights. `full` reads every weight byte; otherwise the safetensors
    headers (tensor names, shapes, dtypes, offsets) and sizes, so that a large foreign model is
    not re-read at every start."""
    digest = hashlib.sha256(model_id.encode())
    for f in sorted(directory.glob("config.json")) + sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            if full or f.suffix == ".json":
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
            else:
                header_len = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(min(header_len, 1 << 26)))
                digest.update(str(f.stat().st_size).encode())
    return f"{model_id}:{digest.hexdigest()[:16]}"


def write_fingerprint(directory: Path, model_id: str) -> str:
    """Hash every byte once and store the result beside the model (for models we converted)."""
    fp = _hash_model_dir(directory, model_id, full=True)
    tmp = directory / (FINGERPRINT_FILE + ".tmp")
    tmp.write_text(json.dumps({"model_id": model_id, "fingerprint": fp}))
    os.replace(tmp, directory / FINGERPRINT_FILE)
    return fp


def is_complete(directory: Path) -> bool:
    """A converted model is complete once its fingerprint is written (it is written last)."""
    return (directory / FINGERPRINT_FILE).is_file()


def fingerprint(directory: Path, model_id: str) -> str:
    """Model id plus a hash of config and weights; stored beside a model we converted."""
    f = directory / FINGERPRINT_FILE
    if f.is_file():
        data = json.loads(f.read_text())
        if data.get("model_id") == model_id:
            return data["fingerprint"]
    return _hash_model_dir(directory, model_id, full=False)
