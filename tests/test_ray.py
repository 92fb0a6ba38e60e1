"""`hotpeft serve --ray`: two engine replicas on a local Ray cluster behind one ingress (tiny model)."""
from __future__ import annotations

import httpx
import pytest
from conftest import ServerProcess

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e .[ray])")

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def ray_server(tiny_dirs, tmp_path_factory):
    server = ServerProcess(["--ray", "--replicas", "2", "--model", str(tiny_dirs["base"]), "--adapters-dir",
                            str(tiny_dirs["adapters"]), "--dtype", "float32"], tmp_path_factory.mktemp("ray-home"),
                           start_timeout=300)
    # /health answers from the ingress; the engine replicas come up on their own time.
    from conftest import wait_for

    wait_for(lambda: len(_engine_replica_pids()) == 2, 180, what="two engine replicas")
    wait_for(lambda: httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": "base", "prompt": "x", "max_tokens": 1}).status_code == 200, 120, what="serving")
    yield server
    server.stop()


def test_greedy_output_through_ray_equals_the_single_process_server(ray_server, client):
    from openai import OpenAI

    through_ray = OpenAI(base_url=ray_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for model in ("lora-attn", "soft", "tiny-llama"):
        want = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
        got = through_ray.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
        assert got.choices[0].message.content == want.choices[0].message.content, model
    stream = through_ray.completions.create(model="lora-mlp", prompt="count", max_tokens=6, temperature=0,
                                            stream=True)
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    whole = client.completions.create(model="lora-mlp", prompt="count", max_tokens=6, temperature=0)
    assert streamed == whole.choices[0].text


def test_requests_for_one_adapter_stay_on_one_replica(ray_server):
    seen: dict[str, set[str]] = {}
    for _ in range(6):
        for model in ("lora-attn", "lora-mlp"):
            r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                           json={"model": model, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200, r.text
            seen.setdefault(model, set()).add(r.headers["x-hotpeft-replica"])
    assert all(len(replicas) == 1 for replicas in seen.values()), seen


def test_an_adapter_registered_through_the_ingress_is_served(ray_server, extra_adapters):
    folder = extra_adapters["lora-qk"]
    files = [("files", (f.name, f.read_bytes())) for f in folder.iterdir() if f.is_file()]
    r = httpx.post(ray_server.url + "/v1/adapters", data={"name": "fresh"}, files=files, timeout=60)
    assert r.status_code == 201, r.text
    r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                   json={"model": "fresh", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 200 and r.headers["x-hotpeft-adapter"] == "fresh@1", r.text


def _engine_replica_pids() -> list[int]:
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ServeReplica:hotpeft:EngineReplica" in line]


def test_a_replica_killed_mid_stream(ray_server):
    """Its stream ends with a 503 in OpenAI's error shape; new requests are served; Ray restarts it."""
    import os
    import signal

    from conftest import wait_for

    before = _engine_replica_pids()
    assert len(before) == 2
    lines = []
    body = {"model": "lora-attn", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", ray_server.url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 3:
                for pid in before:  # both: whichever runs the stream is gone
                    os.kill(pid, signal.SIGKILL)
    assert '"replica_unavailable"' in lines[-1] and '"error"' in lines[-1], lines[-1]
    for _ in range(5):  # right after the loss: served by a restarted replica, or a clean 503 to retry
        r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                       json={"model": "lora-attn", "prompt": "x", "max_tokens": 2})
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "replica_unavailable"
    wait_for(lambda: len(set(_engine_replica_pids()) - set(before)) == 2, 120, what="both replicas restarted")
    wait_for(lambda: httpx.post(ray_server.url + "/v1/completions", timeout=120, json={
        "model": "lora-attn", "prompt": "x", "max_tokens": 2}).status_code == 200, 120, what="serving again")


def test_an_unreachable_ray_address_is_a_clear_error_at_once(tiny_dirs, tmp_path):
    import subprocess
    import sys

    from hotpeft.server.localserver import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "hotpeft.server.cli", "serve", "--ray", "--ray-address", address,
                           "--model", str(tiny_dirs["base"])], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HOTPEFT_HOME": str(tmp_path)})
    assert proc.returncode == 3
    assert f"cannot reach the Ray cluster at --ray-address {address}" in proc.stderr
