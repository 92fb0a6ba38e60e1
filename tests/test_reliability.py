"""Limits, faults survived, safe shutdown, hostile files: each test records its figure for RELIABILITY.md.

All against real `hotpeft serve` processes on 127.0.0.1 with the tiny model.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess, rss_bytes, wait_for

LIMITS = ["--max-prompt-tokens", "64", "--max-total-tokens", "96", "--max-n", "2", "--max-stop", "2",
          "--max-stop-length", "8", "--max-body-bytes", "4096"]


@pytest.fixture(scope="module")
def rel(tiny_dirs, tmp_path_factory):
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--adapters-dir", str(tiny_dirs["adapters"]),
                            "--dtype", "float32", "--max-adapter-bytes", str(1 << 20), "--max-queue", "24", *LIMITS],
                           tmp_path_factory.mktemp("rel-home"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(rel):
    with httpx.Client(base_url=rel.url, timeout=120) as c:
        yield c


def engine_stats(server) -> dict:
    return httpx.get(server.url + "/ready", timeout=30).json()["engine"]


def complete(http, model="base", max_tokens=4, **extra) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": "The sky is", "max_tokens": max_tokens,
                                               "temperature": 0, **extra})


LONG = " ".join(["word"] * 120)
LIMIT_CASES = {
    # name: (path, body, status, param, words in the message)
    "prompt tokens": ("/v1/completions", {"model": "base", "prompt": LONG, "max_tokens": 1}, 400, "prompt",
                      "--max-prompt-tokens"),
    "prompt tokens (chat)": ("/v1/chat/completions", {"model": "base", "max_tokens": 1,
                                                      "messages": [{"role": "user", "content": LONG}]}, 400,
                             "messages", "--max-prompt-tokens"),
    "total tokens": ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 200}, 400, "max_tokens",
                     "--max-total-tokens"),
    "n": ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 1, "n": 3}, 400, "n", "--max-n"),
    "choices": ("/v1/completions", {"model": "base", "prompt": ["a", "b"], "max_tokens": 1, "n": 2}, 400, "prompt",
                "--max-n"),
    "stop count": ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 1, "stop": ["a", "b", "c"]},
                   400, "stop", "--max-stop"),
    "stop length": ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 1, "stop": ["123456789"]}, 400,
                    "stop", "--max-stop-length"),
    "max_tokens 0": ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens",
                     "max_tokens must be at least 1 (0 only with echo"),
    "no messages": ("/v1/chat/completions", {"model": "base", "messages": []}, 400, "messages", "at least 1"),
    "trust_remote_code": ("/v1/chat/completions", {"model": "base", "trust_remote_code": True,
                                                   "messages": [{"role": "user", "content": "x"}]}, 400,
                          "trust_remote_code", "Unrecognized request argument"),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_each_limit_is_a_4xx_naming_it(http, case):
    path, body, status, param, words = LIMIT_CASES[case]
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert complete(http).status_code == 200  # and the server goes on


def test_body_size_limit_with_and_without_content_length(http, figure):
    big = {"model": "base", "prompt": "x" * 5000, "max_tokens": 1}
    r = http.post("/v1/completions", json=big)
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "request_too_large"
    chunks = [b'{"model": "base", "prompt": "', *[b"y" * 1000] * 6, b'", "max_tokens": 1}']
    r = http.post("/v1/completions", content=iter(chunks), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert complete(http).status_code == 200
    # The empty prompt is no crash: it becomes the beginning-of-text token.
    r = http.post("/v1/completions", json={"model": "base", "prompt": "", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] >= 1
    figure("limits", refusals=len(LIMIT_CASES) + 2, all_4xx=True)


def test_fifty_bad_uploads_during_good_traffic(rel, http, tiny_dirs, tmp_path, figure):
    from test_adapters_api import _bad_uploads, upload

    # what is bad under this server's limits (the other module's server has a lower --max-lora-rank)
    cases = [c for name, c in _bad_uploads(tiny_dirs, tmp_path).items() if name not in ("too-large", "rank")]
    stop = threading.Event()
    good, errors = [], []

    def traffic(model: str):
        with httpx.Client(base_url=rel.url, timeout=120) as c:
            while not stop.is_set():
                r = complete(c, model, max_tokens=6)
                (good if r.status_code == 200 else errors).append(r.status_code)

    threads = [threading.Thread(target=traffic, args=(m,)) for m in ("lora-attn", "soft", "base", "lora-mlp")]
    for t in threads:
        t.start()
    refused = []
    try:
        for i in range(50):
            name, folder, kw, status, _, _ = cases[i % len(cases)]
            refused.append(upload(http, name, folder, **kw).status_code)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert all(400 <= s < 500 for s in refused), [s for s in refused if not 400 <= s < 500]
    assert errors == [] and len(good) > 0
    figure("bad_uploads", uploads=50, refused_4xx=len(refused), good_requests=len(good), good_errors=len(errors))


def _object_of(server, http, name: str) -> Path:
    sha = http.get(f"/v1/adapters/{name}").json()["versions"][-1]["sha256"]
    for weights in (server.home / "store" / "objects").glob("*/*/adapter_model.safetensors"):
        if hashlib.sha256(weights.read_bytes()).hexdigest() == sha:
            return weights
    raise AssertionError(f"no stored object for {name}")


@pytest.mark.parametrize("fault", ["corrupt", "deleted"])
def test_a_broken_stored_adapter_fails_alone(rel, http, tiny_dirs, tmp_path, fault, figure):
    from test_adapters_api import lora_folder, upload

    victim = f"victim-{fault}"
    assert upload(http, victim, lora_folder(tmp_path, tiny_dirs, victim, seed=77 if fault == "corrupt" else 78)).status_code == 201
    assert complete(http, victim).status_code == 200
    assert http.post(f"/v1/adapters/{victim}/unload", json={}).status_code == 200  # only on disk now
    weights = _object_of(rel, http, victim)
    if fault == "corrupt":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    r = complete(http, victim)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "adapter_unavailable" and f"adapter {victim}@1 cannot be served" in err["message"]
    assert ("corrupt" if fault == "corrupt" else "missing") in err["message"]
    assert str(rel.home) not in err["message"]  # no server paths in errors
    others = [complete(http, m).status_code for m in ("base", "lora-attn", "soft", "lora-mlp")]
    assert others == [200] * 4
    assert http.delete(f"/v1/adapters/{victim}").status_code == 200  # the way out the message names
    figure(f"stored_adapter_{fault}", status=500, others_ok=len(others))


def test_a_thousand_disconnects_leave_nothing_running(rel, figure):
    async def one(http: httpx.AsyncClient, stream: bool) -> int:
        body = {"model": "lora-attn", "prompt": "Tell me a long story", "max_tokens": 60, "ignore_eos": True}
        if stream:
            for _ in range(200):  # bounded; a 429 (queue full of not yet dropped requests) is retried
                async with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                    if r.status_code == 429:
                        await r.aread()
                        await asyncio.sleep(0.05)
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            return 1  # leaving the block closes the connection mid-stream
                    return 0
            return 0
        try:  # mid-request: the client gives up before the answer
            await asyncio.wait_for(http.post("/v1/completions", json=body), timeout=0.05)
        except asyncio.TimeoutError:
            pass
        return 0

    async def run(n: int, stream_every: int) -> int:
        sem = asyncio.Semaphore(50)
        # No keep-alive: every disconnect is a connection really closed under a running request.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=rel.url, timeout=120, limits=limits) as http:
            async def bounded(i):
                async with sem:
                    return await one(http, i % stream_every != 0)
            return sum(await asyncio.gather(*(bounded(i) for i in range(n))))

    asyncio.run(run(100, 5))  # warm up
    wait_for(lambda: engine_stats(rel)["running"] == 0, 60, what="warm-up drained")
    rss_before = rss_bytes(rel.proc.pid)
    tokens_before = engine_stats(rel)["tokens"]
    t0 = time.monotonic()
    streamed = asyncio.run(run(1000, 5))
    idle = lambda: (lambda s: s["running"] == 0 and s["waiting"] == 0)(engine_stats(rel))  # noqa: E731
    wait_for(idle, 60, what="engine idle after the disconnects")
    settle_s = time.monotonic() - t0
    wait_for(lambda: httpx.get(rel.url + "/ready", timeout=30).json()["http"]["in_flight"] == 0, 30,
             what="no HTTP request in flight")
    rss_after = rss_bytes(rel.proc.pid)
    tokens = engine_stats(rel)["tokens"] - tokens_before
    assert streamed == 800
    assert tokens < 1000 * 60 * 0.5, tokens  # stopped early: far from every request's 60 tokens
    assert rss_after <= rss_before * 1.10, (rss_before, rss_after)
    assert complete(httpx.Client(base_url=rel.url, timeout=60)).status_code == 200
    figure("disconnects", requests=1000, mid_stream=800, mid_request=200, tokens_generated=tokens,
           tokens_per_request=round(tokens / 1000, 1), seconds_to_idle=round(settle_s, 1),
           rss_before_mib=round(rss_before / 2**20, 1), rss_after_mib=round(rss_after / 2**20, 1))


def test_hundred_concurrent_clients(rel, figure):
    """`hotpeft loadtest` for a bounded time: no 5xx, every request served or 429, memory flat."""
    def loadtest(seconds: int) -> dict:
        import json

        out = subprocess.run([sys.executable, "-m", "hotpeft.cli", "loadtest", "--url", rel.url, "--clients",
                              "100", "--duration", str(seconds), "--model", "base", "--model", "lora-attn",
                              "--model", "soft"], capture_output=True, text=True, timeout=seconds + 120)
        assert out.returncode in (0, 1), out.stderr
        return json.loads(out.stdout)

    loadtest(5)  # warm up
    rss_before = rss_bytes(rel.proc.pid)
    summary = loadtest(20)
    rss_after = rss_bytes(rel.proc.pid)
    assert summary["server_errors"] == 0 and summary["transport_errors"] == {}, summary
    assert set(summary["status"]) <= {"200", "429"} and summary["status"].get("200", 0) > 100, summary
    assert rss_after <= rss_before * 1.10, (rss_before, rss_after)
    figure("hundred_clients", **summary, rss_before_mib=round(rss_before / 2**20, 1),
           rss_after_mib=round(rss_after / 2**20, 1))


class _Canary:
    """Unpickling this creates the canary folder: proof that someone loaded a pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_pickle_canary_never_fires(rel, http, tiny_dirs, tmp_path, figure):
    import io
    import zipfile

    from test_adapters_api import upload

    canary = tmp_path / "canary-fired"
    payload = pickle.dumps(_Canary(canary))
    zipped = io.BytesIO()  # torch.save's format: a zip whose data.pkl is the pickle
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", payload)
    attn = tiny_dirs["adapters"] / "lora-attn"
    statuses = [
        upload(http, "canary-bin", attn, extra={"adapter_model.bin": payload}).status_code,
        upload(http, "canary-pt", attn, extra={"adapter_model.pt": payload}).status_code,
        upload(http, "canary-st", attn, skip=("adapter_model.safetensors",),
               extra={"adapter_model.safetensors": payload}).status_code,
        upload(http, "canary-zip", attn, skip=("adapter_model.safetensors",),
               extra={"adapter_model.safetensors": zipped.getvalue()}).status_code,
        http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", payload)}).status_code,
    ]
    # A folder holding only pickle weights, as --adapters-dir at start-up would find it.
    folder = tmp_path / "adapters" / "pickled"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text((attn / "adapter_config.json").read_text())
    (folder / "adapter_model.bin").write_bytes(payload)
    proc = subprocess.run([sys.executable, "-m", "hotpeft.cli", "serve", "--model", str(tiny_dirs["base"]),
                           "--adapters-dir", str(folder.parent), "--dtype", "float32", "--port", "1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HOTPEFT_HOME":
                                                                             str(tmp_path / "home")})
    assert all(400 <= s < 500 for s in statuses), statuses
    assert proc.returncode != 0 and "pickle" in proc.stdout + proc.stderr
    assert not canary.exists()
    figure("pickle_canary", attempts=len(statuses) + 1, refused=len(statuses) + 1, canary_fired=canary.exists())


def test_training_files_are_private(rel, http, word_data):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=rel.url + "/v1", api_key="unused", max_retries=0)
    with open(word_data["pairs"], "rb") as fh:
        f = client.files.create(file=fh, purpose="fine-tune")
    with pytest.raises(NotFoundError):  # never served back over HTTP
        client.files.content(f.id)
    stored = rel.home / "files" / f"{f.id}.jsonl"
    assert stored.stat().st_mode & 0o777 == 0o600 and (rel.home / "files").stat().st_mode & 0o777 == 0o700
    assert http.get("/v1/files/..%2F..%2Fregistry.db").status_code == 404


def test_derived_paths_stay_inside_their_root(tmp_path):
    from hotpeft.adapters.paths import UnsafePath, inside
    from hotpeft.adapters.store import AdapterStore

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    assert inside(root, "sub", "x") == (root / "sub" / "x").resolve()
    for parts in (("..", "outside"), ("escape", "x"), ("/etc",), ("sub", ""), ("a\0b",)):
        with pytest.raises(UnsafePath):
            inside(root, *parts)
    store = AdapterStore(tmp_path / "store")
    for key in ("../../etc", "ab" * 32 + "/..", "AB" * 32, ""):
        with pytest.raises(UnsafePath):
            store.path(key)


def test_ready_turns_503_while_the_engine_stalls(tiny_dirs, tmp_path, figure):
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32", "--stall-timeout", "1"],
                           tmp_path / "home", env={"HOTPEFT_FAILPOINT": "engine.step=sleep:4"})
    try:
        assert httpx.get(server.url + "/ready", timeout=30).status_code == 200  # idle is not stalled
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(
            server.url + "/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 1}, timeout=120)))
        worker.start()
        stalled = wait_for(lambda: (lambda r: r if r.status_code == 503 else None)(
            httpx.get(server.url + "/ready", timeout=30)), 30, what="/ready 503")
        assert "engine stalled" in stalled.json()["reason"]
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # alive all along
        worker.join(120)
        assert result["r"].status_code == 200
        wait_for(lambda: httpx.get(server.url + "/ready", timeout=30).status_code == 200, 30, what="ready again")
        figure("stalled_engine", stall_timeout_s=1, step_sleep_s=4, ready_503=True, recovered=True)
    finally:
        server.stop()


def _streams(url: str, n: int, max_tokens: int, started: set, pause: float = 0.0):
    async def one(http, i):
        chunks, done, errors = 0, False, []
        body = {"model": "base", "prompt": "count", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if '"error"' in line:
                        errors.append(line)
                    chunks += 1
                    started.add(i)
                    if pause:
                        await asyncio.sleep(pause)
        return r.status_code, chunks, done, errors

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(n)))

    return run


def test_sigterm_with_ten_streams_running(tiny_dirs, tmp_path, figure):
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32"], tmp_path / "home")
    started: set = set()
    results = {}
    runner = threading.Thread(target=lambda: results.update(out=asyncio.run(
        _streams(server.url, 10, 200, started, pause=0.01)())))
    try:
        runner.start()
        wait_for(lambda: len(started) == 10, 60, what="10 streams running")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(server.url + "/ready", timeout=30).status_code == 503, 10, what="/ready 503")
        refused = httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 1},
                             timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        runner.join(120)
        code = server.proc.wait(60)
        drain_s = time.monotonic() - t0
    finally:
        server.stop()
    out = results["out"]
    assert [s for s, _, done, errors in out] == [200] * 10
    assert all(done and not errors and chunks > 10 for _, chunks, done, errors in out), out
    assert code == 0
    assert "drained in" in server.log_text()
    figure("sigterm_drain", streams=10, completed=10, new_request_status=503, exit_code=code,
           seconds_to_exit=round(drain_s, 1))


def test_drain_timeout_ends_what_is_left_and_exits_cleanly(tiny_dirs, tmp_path, figure):
    """A stalled engine cannot finish its streams: past --drain-timeout they end with a 503 error, exit 0."""
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32", "--drain-timeout", "2"],
                           tmp_path / "home", env={"HOTPEFT_FAILPOINT": "engine.step=sleep:1"})
    started: set = set()
    results = {}
    runner = threading.Thread(target=lambda: results.update(out=asyncio.run(_streams(server.url, 3, 100, started)())))
    try:
        runner.start()
        wait_for(lambda: len(started) == 3, 60, what="3 streams running")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        runner.join(120)
        code = server.proc.wait(60)
        exit_s = time.monotonic() - t0
    finally:
        server.stop()
    for status, _, done, errors in results["out"]:
        assert status == 200 and not done and errors and "shutting_down" in errors[0]
    assert code == 0
    figure("drain_timeout", streams=3, drain_timeout_s=2, ended_with_503_error=3, exit_code=code,
           seconds_to_exit=round(exit_s, 1))


def test_registry_unreachable_keeps_serving_and_refuses_changes(tiny_dirs, tmp_path, postgres_server, figure):
    """The shared registry goes away: known adapters keep serving, changes are a 503, /ready says degraded."""
    import psycopg
    from sqlalchemy.engine import make_url
    from test_adapters_api import lora_folder, upload

    url = postgres_server()
    db = make_url(url)
    admin = f"host={db.host} port={db.port} user=postgres dbname=postgres"
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--adapters-dir", str(tiny_dirs["adapters"]),
                            "--dtype", "float32", "--registry-url", url], tmp_path / "home")

    def allow(on: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {db.database} WITH ALLOW_CONNECTIONS {str(on).lower()}")
            if not on:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                             (db.database,))

    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            assert complete(http, "lora-attn").status_code == 200
            allow(False)
            ready = wait_for(lambda: (lambda r: r if r.json()["status"] == "degraded" else None)(
                http.get("/ready")), 30, what="/ready degraded")
            assert ready.status_code == 200 and "registry unreachable" in ready.json()["reason"]
            served = [complete(http, m).status_code for m in ("lora-attn", "soft", "base", "lora-mlp")]
            assert served == [200] * 4
            r = upload(http, "during-outage", lora_folder(tmp_path, tiny_dirs, "during-outage", seed=91))
            assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable", r.text
            assert http.post("/v1/adapters/lora-attn/promote", json={"version": 1}).status_code == 503
            allow(True)
            wait_for(lambda: http.get("/ready").json()["status"] == "ready", 30, what="/ready again")
            r = upload(http, "after-outage", lora_folder(tmp_path, tiny_dirs, "after-outage", seed=92))
            assert r.status_code == 201, r.text
            assert complete(http, "after-outage").status_code == 200
        figure("registry_unreachable", served_during_outage=len(served), registration_status=503,
               ready_status="degraded", recovered=True)
    finally:
        allow(True)
        server.stop()
