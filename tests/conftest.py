"""Shared fixtures: the tiny model and its adapters on disk, and real servers on 127.0.0.1."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from hotpeft.server.localserver import LocalServer  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{'base': dir, 'adapters': dir of PEFT folders} for the tiny model."""
    root = tmp_path_factory.mktemp("tiny")
    base = tiny.save_tiny_model(root / tiny.TINY_ID)
    adapters = root / "adapters"
    tiny.save_lora(base, adapters / "lora-attn", r=8, targets=["q_proj", "v_proj"], seed=1)
    tiny.save_lora(base, adapters / "lora-mlp", r=16, targets=ALL_LINEAR, seed=2, rslora=True)
    tiny.save_prompt_tuning(base, adapters / "soft", n_virtual=6, seed=3)
    shutil.copytree(adapters / "lora-attn", adapters / "lora-tmpl")
    (adapters / "lora-tmpl" / "chat_template.jinja").write_text(ADAPTER_TEMPLATE)
    return {"base": base, "adapters": adapters}


class ServerProcess(LocalServer):
    """`hotpeft serve` on 127.0.0.1 with its own home; its log is `<home>/server.log`."""

    def __init__(self, args: list[str], home: Path, env: dict | None = None, start_timeout: float = 300):
        super().__init__(args, home / "server.log", {"HOTPEFT_HOME": str(home), **(env or {})}, start_timeout)


@pytest.fixture(scope="session")
def tiny_server(tiny_dirs, tmp_path_factory):
    server = ServerProcess(
        ["--model", str(tiny_dirs["base"]), "--adapters-dir", str(tiny_dirs["adapters"]), "--dtype", "float32"],
        tmp_path_factory.mktemp("tiny-home"),
        env={"HOTPEFT_MAX_N": "4"},  # an env var maps onto the same setting as its flag
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(tiny_server):
    from openai import OpenAI

    return OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_home(tmp_path_factory):
    """One home for the real default model: it is converted from the GGUF once per test session."""
    return tmp_path_factory.mktemp("real-home")
