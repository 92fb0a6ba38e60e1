"""Shared fixtures: the tiny model and its adapters on disk, and real servers on 127.0.0.1."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from hotpeft.server.tools.localserver import LocalServer, free_port  # noqa: E402

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
        self.home = home
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
def tool_lora(tmp_path_factory):
    """(base folder with a 1,024-token context, a LoRA trained on it to call get_weather): tool_adapter.py."""
    from tool_adapter import train_tool_adapter

    root = tmp_path_factory.mktemp("tool-lora")
    base = tiny.save_tiny_model(root / tiny.TINY_ID, max_positions=1024)
    return base, train_tool_adapter(base, root / "tool-weather")


@pytest.fixture(scope="session")
def model_home(tmp_path_factory):
    """One home for the real default model: it is converted from the GGUF once per test session."""
    return tmp_path_factory.mktemp("real-home")


@pytest.fixture(scope="session")
def extra_adapters(tiny_dirs, tmp_path_factory):
    """Adapters that no server registers at start-up: {name: folder}."""
    root = tmp_path_factory.mktemp("extra")
    return {
        "lora-qk": tiny.save_lora(tiny_dirs["base"], root / "lora-qk", r=8, targets=["q_proj", "k_proj"], seed=5),
        "lora-r4": tiny.save_lora(tiny_dirs["base"], root / "lora-r4", r=4, targets=["o_proj", "up_proj"], seed=6),
    }


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on 127.0.0.1 for this test session: yields a function that makes a
    fresh empty database and returns its SQLAlchemy URL."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; scripts/install.sh --test installs it "
                    "where apt-get can)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("the psycopg driver is not installed (pip install -e .[test])")
    # initdb refuses to run as root: run the server as the 'postgres' user the Debian package creates.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="hotpeft-pg-"))
    data.chmod(0o755)
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)  # noqa: E731
    try:
        run(str(bindir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        shutil.rmtree(data, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {getattr(e, 'stderr', b'') or e}")
    counter = iter(range(1_000_000))

    def new_database() -> str:
        import psycopg

        name = f"hotpeft_{next(counter)}"
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"

    yield new_database
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                   capture_output=True, timeout=60)
    shutil.rmtree(data, ignore_errors=True)


WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "paper", "music", "light", "ocean", "bread", "chair",
         "plant", "sugar", "train", "water"]


@pytest.fixture(scope="session")
def word_data(tmp_path_factory):
    """A task the tiny model learns in seconds: {'pairs': train, 'pairs_valid': held-out, 'chat': chat train}."""
    import json
    import random

    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)

    def write(name: str, rows: list[dict]) -> Path:
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    pair = lambda w: {"prompt": f"word: {w}\nanswer:", "completion": f" {w.upper()}"}  # noqa: E731
    chat = lambda w: {"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w.upper()}]}  # noqa: E731
    return {
        "pairs": write("pairs.jsonl", [pair(rng.choice(WORDS)) for _ in range(64)]),
        "pairs_valid": write("pairs-valid.jsonl", [pair(w) for w in WORDS[:8]]),
        "chat": write("chat.jsonl", [chat(rng.choice(WORDS)) for _ in range(48)]),
    }


@pytest.fixture(scope="session")
def trainer_server(tiny_dirs, tmp_path_factory):
    """A server on the tiny model whose home the training tests share (its registry, store, jobs)."""
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32", "--max-file-bytes", str(1 << 20)],
                           tmp_path_factory.mktemp("trainer-home"))
    yield server
    server.stop()


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def figure():
    """`figure(test, **values)`: a measured figure for RELIABILITY.md, kept in test-artifacts/reliability.json."""
    import json

    path = Path(__file__).resolve().parent.parent / "test-artifacts" / "reliability.json"
    path.parent.mkdir(exist_ok=True)
    figures: dict = {}

    def record(test: str, **values) -> None:
        figures[test] = values
        path.write_text(json.dumps(figures, indent=1))

    return record


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextlib.contextmanager
def prometheus_scraping(server, tmp_path: Path, prometheus: str):
    """A real Prometheus with deploy/'s config and rules, scraping `server` every second; yields
    (query(promql) -> result list, API base URL)."""
    import httpx

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    config = (deploy / "prometheus/prometheus.yml").read_text()
    config = config.replace('"hotpeft:8000"', f'"127.0.0.1:{server.port}"').replace("scrape_interval: 5s",
                                                                                    "scrape_interval: 1s")
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(deploy / "prometheus/alerts.yml", tmp_path / "alerts.yml")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)

    def query(q: str) -> list:
        try:
            r = httpx.get(api + "/query", params={"query": q}, timeout=5)
        except httpx.TransportError:
            return []
        return r.json()["data"]["result"] if r.status_code == 200 else []

    try:
        wait_for(lambda: query('up{job="hotpeft"} == 1'), 60, what="Prometheus scraping the test server")
        yield query, api
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
