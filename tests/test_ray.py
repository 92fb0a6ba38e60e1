"""`hotpeft serve --ray`: two engine replicas on a local Ray cluster behind one ingress (tiny model)."""
from __future__ import annotations

import httpx
import pytest
from conftest import ServerProcess

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e .[ray])")

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def shared(postgres_server, tmp_path_factory):
    """One PostgreSQL registry and one adapter store for every process of these tests."""
    return {"registry": postgres_server(), "store": tmp_path_factory.mktemp("shared-store")}


@pytest.fixture(scope="module")
def ray_server(tiny_dirs, shared, tmp_path_factory):
    server = ServerProcess(["--ray", "--replicas", "2", "--model", str(tiny_dirs["base"]), "--adapters-dir",
                            str(tiny_dirs["adapters"]), "--dtype", "float32", "--registry-url", shared["registry"],
                            "--store-dir", str(shared["store"])], tmp_path_factory.mktemp("ray-home"),
                           start_timeout=300)
    # /health answers from the ingress; the engine replicas come up on their own time.
    from conftest import wait_for

    wait_for(lambda: len(_engine_replica_pids()) == 2, 180, what="two engine replicas")
    wait_for(lambda: httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": "base", "prompt": "x", "max_tokens": 1}).status_code == 200, 120, what="serving")
    wait_for(lambda: httpx.get(server.url + "/ready").json()["status"] == "ready", 60, what="both replicas on the board")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def second_server(tiny_dirs, shared, tmp_path_factory):
    """A single-process server on the same registry and store: another writer of the catalogue."""
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32", "--registry-url",
                            shared["registry"], "--store-dir", str(shared["store"])], tmp_path_factory.mktemp("home-b"))
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
    # logprobs, echo and a grammar cross to the replicas and back whole
    kw = dict(model="soft", prompt="count", max_tokens=4, temperature=0, logprobs=2, echo=True,
              extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    want, got = client.completions.create(**kw).choices[0], through_ray.completions.create(**kw).choices[0]
    assert got.text == want.text and got.text[len("count"):].isdigit()
    assert got.logprobs.token_logprobs == want.logprobs.token_logprobs and got.logprobs.top_logprobs[0] is None


def test_requests_for_one_adapter_stay_on_one_replica(ray_server, extra_adapters):
    """Once a replica holds an adapter (and Serve's routers have heard so), its requests go there."""
    from conftest import wait_for

    folder = extra_adapters["lora-qk"]
    files = [("files", (f.name, f.read_bytes())) for f in folder.iterdir() if f.is_file()]
    names = ("affinity-a", "affinity-b")
    for name in names:
        r = httpx.post(ray_server.url + "/v1/adapters", data={"name": name}, files=files, timeout=60)
        assert r.status_code == 201, r.text
        r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                       json={"model": name, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
        # The board hears of the load after Serve's routers do (a second's posting against 0.1 s).
        wait_for(lambda: "device" in httpx.get(ray_server.url + f"/v1/adapters/{name}").json()["versions"][0]
                 ["replicas"].values(), 15, what=f"{name} resident on a replica")
    seen: dict[str, set[str]] = {}
    for _ in range(6):
        for name in names:
            r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                           json={"model": name, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200, r.text
            seen.setdefault(name, set()).add(r.headers["x-hotpeft-replica"])
    assert all(len(replicas) == 1 for replicas in seen.values()), seen


def test_an_adapter_registered_through_the_ingress_is_served(ray_server, extra_adapters):
    folder = extra_adapters["lora-qk"]
    files = [("files", (f.name, f.read_bytes())) for f in folder.iterdir() if f.is_file()]
    r = httpx.post(ray_server.url + "/v1/adapters", data={"name": "fresh"}, files=files, timeout=60)
    assert r.status_code == 201, r.text
    r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                   json={"model": "fresh", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 200 and r.headers["x-hotpeft-adapter"] == "fresh@1", r.text


def _ready(server) -> dict:
    return httpx.get(server.url + "/ready", timeout=30).json()


def _samples(server, name: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=30).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def _count(server, name: str, **labels) -> float:
    return sum(s.value for s in _samples(server, name) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_ready_counts_the_engine_replicas(ray_server):
    ready = _ready(ray_server)
    assert ready["status"] == "ready", ready
    replicas = ready["engine"]["replicas"]
    assert replicas["up"] == 2 and replicas["target"] == 2 and len(replicas["ids"]) == 2, replicas
    assert ready["engine"]["slots"] > 0  # summed over the replicas, not the ingress's empty engine


def test_metrics_carry_the_replica_label(ray_server):
    from conftest import wait_for

    replicas = set(_ready(ray_server)["engine"]["replicas"]["ids"])
    text = httpx.get(ray_server.url + "/metrics", timeout=30).text
    # one declaration per family even though several processes report it
    assert text.count("# TYPE hotpeft_engine_step_duration_seconds histogram") == 1
    # every engine replica's own families, told apart by `replica`
    steps = {s.labels["replica"] for s in _samples(ray_server, "hotpeft_engine_step_duration_seconds_count")}
    assert steps == replicas
    generations = {s.labels["replica"] for s in _samples(ray_server, "hotpeft_registry_generation") if "replica" in s.labels}
    assert generations == replicas
    # a request is counted under the replica that answered it (any ingress may answer the scrape)
    labels = {"adapter": "lora-mlp", "endpoint": "completions", "outcome": "ok"}
    before = {r: _count(ray_server, "hotpeft_requests_total", replica=r, **labels) for r in replicas}
    r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                   json={"model": "lora-mlp", "prompt": "x", "max_tokens": 2})
    served = r.headers["x-hotpeft-replica"]
    assert served in replicas
    wait_for(lambda: _count(ray_server, "hotpeft_requests_total", replica=served, **labels) == before[served] + 1,
             15, what="the request counted under its replica")
    assert all(_count(ray_server, "hotpeft_requests_total", replica=o, **labels) == before[o]
               for o in replicas - {served})


def test_a_mix_through_ray_equals_the_single_process_mix(ray_server, client):
    from openai import OpenAI

    through_ray = OpenAI(base_url=ray_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    mix = {"adapters": [{"name": "lora-attn", "weight": 0.7}, {"name": "lora-mlp", "weight": 0.3}],
           "merge_strategy": "cat"}
    want = client.completions.create(model="tiny-llama", prompt="count", max_tokens=8, temperature=0, extra_body=mix)
    for _ in range(2):  # built on first use, then from the replica's tiers
        got = through_ray.completions.create(model="tiny-llama", prompt="count", max_tokens=8, temperature=0,
                                             extra_body=mix)
        assert got.choices[0].text == want.choices[0].text


def test_load_pin_and_unload_act_on_every_replica(ray_server):
    from conftest import wait_for

    r = httpx.post(ray_server.url + "/v1/adapters/lora-mlp/load", json={"pin": True}, timeout=120)
    assert r.status_code == 200 and r.json()["pinned"] is True, r.text
    version = r.json()["version"]

    def placement() -> dict:
        versions = httpx.get(ray_server.url + "/v1/adapters/lora-mlp", timeout=30).json()["versions"]
        return next(v for v in versions if v["version"] == version)

    try:
        wait_for(lambda: set(placement()["replicas"].values()) == {"device"} and len(placement()["replicas"]) == 2,
                 15, what="lora-mlp on every replica's device")
    except AssertionError as e:
        raise AssertionError(f"{e}: {placement()} {_ready(ray_server)} {r.json()}") from None
    assert placement()["pinned"] is True
    r = httpx.post(ray_server.url + "/v1/adapters/lora-mlp/unload", timeout=120)
    assert r.status_code == 200 and r.json()["changed"] is True, r.text
    wait_for(lambda: "device" not in placement()["replicas"].values() and not placement()["pinned"], 15,
             what="lora-mlp off every replica's device")


def test_the_registry_is_shared_with_another_server(ray_server, second_server, extra_adapters, figure):
    """Registered and deleted through another process: the Ray endpoint follows within seconds."""
    import time

    from conftest import wait_for

    folder = extra_adapters["lora-r4"]
    files = [("files", (f.name, f.read_bytes())) for f in folder.iterdir() if f.is_file()]
    r = httpx.post(second_server.url + "/v1/adapters", data={"name": "elsewhere"}, files=files, timeout=60)
    assert r.status_code == 201, r.text
    t0 = time.monotonic()
    generation = _count(second_server, "hotpeft_registry_generation")

    def served() -> bool:
        r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                       json={"model": "elsewhere", "prompt": "x", "max_tokens": 2})
        assert r.status_code in (200, 404), r.text
        return r.status_code == 200 and r.headers["x-hotpeft-adapter"] == "elsewhere@1"

    wait_for(served, 10, interval=0.05, what="the Ray endpoint serving the new adapter")
    served_s = time.monotonic() - t0
    wait_for(lambda: all(g == generation for g in _ready(ray_server)["engine"]["replicas"]["registry_generation"]
                         .values()), 10, interval=0.05, what="every replica on the new registry generation")
    everywhere_s = time.monotonic() - t0
    r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                   json={"model": "elsewhere", "prompt": "x", "max_tokens": 2})
    holder = r.headers["x-hotpeft-replica"]
    wait_for(lambda: httpx.get(ray_server.url + "/v1/adapters/elsewhere").json()["versions"][0]["replicas"][holder]
             == "device", 15, what="the adapter resident on the replica that served it")

    t1 = time.monotonic()
    assert httpx.delete(second_server.url + "/v1/adapters/elsewhere", timeout=60).status_code == 200
    wait_for(lambda: httpx.post(ray_server.url + "/v1/completions", timeout=120, json={
        "model": "elsewhere", "prompt": "x", "max_tokens": 2}).status_code == 404, 10, interval=0.05,
             what="the deleted adapter refused")
    refused_s = time.monotonic() - t1
    gone = _samples(second_server, "hotpeft_registry_generation")[0].value
    wait_for(lambda: _ready(ray_server)["engine"]["replicas"]["registry_generation"][holder] == gone, 10,
             what="the holder on the generation without it")
    wait_for(lambda: "elsewhere@1" not in _resident(ray_server, holder), 10, what="evicted from its holder")
    figure("ray_shared_registry", served_after_s=round(served_s, 2), every_replica_after_s=round(everywhere_s, 2),
           refused_after_delete_s=round(refused_s, 2))


def test_a_real_prometheus_aggregates_across_replicas(ray_server, tmp_path):
    """The Grafana dashboard's queries, on a real Prometheus scraping the Ray endpoint: latency per
    adapter summed over the replicas, requests per replica."""
    import json
    import shutil
    import time
    from pathlib import Path

    from conftest import prometheus_scraping, wait_for

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; scripts/install.sh --test)")
    board = json.loads((Path(__file__).resolve().parent.parent / "deploy/grafana/dashboards/hotpeft.json").read_text())
    panel = lambda title: next(p for p in board["panels"] if p["title"] == title)  # noqa: E731
    everything = lambda expr: (expr.replace("$adapter", ".*").replace("$replica", ".*")  # noqa: E731
                               .replace("$__rate_interval", "1m"))
    models = ("lora-attn", "affinity-a", "affinity-b", "tiny-llama")

    def one_round() -> set[str]:
        replicas = set()
        for model in models:
            r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                           json={"model": model, "prompt": "x", "max_tokens": 3})
            assert r.status_code == 200, r.text
            replicas.add(r.headers["x-hotpeft-replica"])
        return replicas

    with prometheus_scraping(ray_server, tmp_path, prometheus) as (query, _):
        one_round()  # the request series exist before the measured traffic...
        time.sleep(1.5)  # ...and are scraped once, so that rate() sees the traffic as an increase
        served = set()
        for _ in range(3):
            served |= one_round()
            time.sleep(0.5)
        ttft = everything(panel("Time to first token p50 / p95")["targets"][1]["expr"])
        result = wait_for(lambda: (r := query(ttft)) and {"lora-attn", "affinity-a", "tiny-llama"} <= {
            x["metric"]["adapter"] for x in r if x["value"][1] != "NaN"} and r, 30, what="p95 TTFT per adapter")
        assert all("replica" not in x["metric"] for x in result)  # one series per adapter, over every replica
        per_replica = everything(panel("Requests/s per engine replica")["targets"][0]["expr"])
        # Traffic goes on while we wait: a base request's replica is Serve's choice, and a series that a
        # replica started during the traffic needs a later increase for rate() to count it.
        wait_for(lambda: one_round() is not None and {
            x["metric"].get("replica") for x in query(per_replica) if float(x["value"][1]) > 0} >= served, 30,
            what="requests per replica")


def _resident(server, replica: str) -> list[str]:
    return _ready(server)["engine"]["replicas"]["resident"][replica]


def _engine_replica_pids() -> list[int]:
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ServeReplica:hotpeft:EngineReplica" in line]


def _pid_of(replica: str) -> int:
    """The process of one engine replica: the one that holds that replica's Serve log open."""
    import os

    for pid in _engine_replica_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(f"_EngineReplica_{replica}.log"):
                    return pid
            except OSError:
                pass
    raise AssertionError(f"no process holds the log of replica {replica}")


def test_a_replica_killed_mid_stream(ray_server, extra_adapters, figure):
    """Its stream ends with a 503 in OpenAI's error shape, new requests go to the other replica,
    Ray restarts it, and the new replica serves what was registered meanwhile."""
    import os
    import signal
    import time

    from conftest import wait_for

    before = _engine_replica_pids()
    assert len(before) == 2
    lines, victim = [], None
    body = {"model": "lora-attn", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", ray_server.url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line:
                continue
            lines.append(line)
            if line.startswith(": hotpeft-replica "):
                victim = line.split()[-1]
            if len(lines) == 3:
                os.kill(_pid_of(victim), signal.SIGKILL)
                killed_at = time.monotonic()
    assert '"replica_unavailable"' in lines[-1] and '"error"' in lines[-1], lines[-1]
    survivor = next(r for r in _ready(ray_server)["engine"]["replicas"]["ids"] if r != victim)
    statuses = []

    def served_by_the_survivor() -> bool:
        r = httpx.post(ray_server.url + "/v1/completions", timeout=120,
                       json={"model": "lora-attn", "prompt": "x", "max_tokens": 2})
        assert r.status_code in (200, 503), r.text  # a clean 503 to retry while Serve learns of the loss
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "replica_unavailable"
        statuses.append(r.status_code)
        return r.status_code == 200 and r.headers["x-hotpeft-replica"] == survivor

    wait_for(served_by_the_survivor, 60, interval=0.1, what="the adapter served by the other replica")
    failover_s = time.monotonic() - killed_at
    folder = extra_adapters["lora-r4"]
    files = [("files", (f.name, f.read_bytes())) for f in folder.iterdir() if f.is_file()]
    r = httpx.post(ray_server.url + "/v1/adapters", data={"name": "while-down"}, files=files, timeout=60)
    assert r.status_code == 201, r.text
    wait_for(lambda: len(set(_engine_replica_pids()) - set(before)) == 1, 120, what="the killed replica restarted")
    # The lost replica leaves the board once it has missed its posts for a few seconds.
    ids = wait_for(lambda: (ids := _ready(ray_server)["engine"]["replicas"]["ids"]) and len(ids) == 2
                   and victim not in ids and ids, 120, what="the restarted replica on the board, the lost one gone")
    restarted_s = time.monotonic() - killed_at
    newcomer = next(r for r in ids if r != survivor)
    r = httpx.post(ray_server.url + "/v1/adapters/while-down/load", timeout=120)
    assert r.status_code == 200, r.text
    wait_for(lambda: httpx.get(ray_server.url + "/v1/adapters/while-down").json()["versions"][0]["replicas"]
             .get(newcomer) == "device", 15, what="the new replica holding the adapter registered while it was down")
    figure("ray_replica_killed", failover_s=round(failover_s, 2), requests_until_failover=len(statuses),
           answered_503=statuses.count(503), restarted_and_posting_after_s=round(restarted_s, 1))


def test_an_unreachable_ray_address_is_a_clear_error_at_once(tiny_dirs, tmp_path, figure):
    import subprocess
    import sys
    import time

    from hotpeft.server.tools.localserver import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hotpeft.cli", "serve", "--ray", "--ray-address", address,
                           "--model", str(tiny_dirs["base"])], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HOTPEFT_HOME": str(tmp_path)})
    assert proc.returncode == 3
    assert f"cannot reach the Ray cluster at --ray-address {address}" in proc.stderr
    figure("ray_unreachable_address", exit_status=proc.returncode, seconds=round(time.monotonic() - t0, 1))
