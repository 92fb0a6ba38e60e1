"""Shared fixtures: the tiny model and its adapters on disk, and real servers on 127.0.0.1."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`hotpeft serve` as a subprocess on 127.0.0.1; waits (bounded) until /health answers."""

    def __init__(self, args: list[str], home: Path, env: dict | None = None, start_timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "server.log"
        home.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "HOTPEFT_HOME": str(home), **(env or {})}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hotpeft.server.cli", "serve", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
        )
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer within {start_timeout}s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


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
