"""The adapter admin API over HTTP against `hotpeft serve` on 127.0.0.1: every operation, every bad
input, hot-swap under load, per-request mixes, and the `hotpeft adapters` CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ServerProcess

import tiny

PROMPT = "The adapter says"
MAX_BYTES = 100_000  # lora-mlp (~135 kB of weights) is over it; the others are under


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("import-root")
    outside = tmp_path_factory.mktemp("outside")
    return root, outside


@pytest.fixture(scope="module")
def server(tiny_dirs, roots, tmp_path_factory):
    s = ServerProcess(
        ["--model", str(tiny_dirs["base"]), "--dtype", "float32", "--import-root", str(roots[0]),
         "--max-adapter-bytes", str(MAX_BYTES), "--max-lora-rank", "8"],
        tmp_path_factory.mktemp("admin-home"),
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def upload(http, name, folder: Path, *, description="", extra: dict[str, bytes] | None = None, skip=(),
           force_new_version: bool = False):
    files = [("files", (f.name, f.read_bytes())) for f in sorted(folder.iterdir())
             if f.is_file() and f.name not in skip]
    files += [("files", (fname, data)) for fname, data in (extra or {}).items()]
    data = {"name": name, "description": description} | ({"force_new_version": "true"} if force_new_version else {})
    return http.post("/v1/adapters", data=data, files=files)


def complete(client, model, max_tokens=8, **extra):
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                                      temperature=0, extra_body={"ignore_eos": True, **extra})
    return raw.headers["x-hotpeft-adapter"], raw.parse().choices[0].text


def assert_error(r: httpx.Response, status: int, *, param=None, match: str = ""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    assert match in err["message"], err["message"]
    return err


def state(http) -> dict:
    return {a["name"]: [(v["version"], v["sha256"], v["active"]) for v in a["versions"]]
            for a in http.get("/v1/adapters").json()["data"]}


def lora_folder(tmp_path: Path, tiny_dirs, name: str, seed: int, r: int = 4) -> Path:
    """A LoRA on q_proj and v_proj, written directly (fast): rank r, random weights from `seed`."""
    src = tiny_dirs["adapters"] / "lora-attn"
    out = tmp_path / name
    out.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text()) | {"r": r, "lora_alpha": 2 * r}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(((r if "lora_A" in k else v.shape[0]), (v.shape[1] if "lora_A" in k else r)),
                              generator=g) * (0.3 if "lora_A" in k else 1.0)
               for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(tensors, out / "adapter_model.safetensors")
    return out


# ---- each operation ------------------------------------------------------------------------------
def test_upload_list_show_promote_delete(http, client, tiny_dirs):
    r = upload(http, "ops", tiny_dirs["adapters"] / "lora-attn", description="first")
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert (v1["name"], v1["version"], v1["kind"], v1["rank"], v1["active"], v1["source"]) == \
        ("ops", 1, "lora", 8, True, "upload")
    assert v1["description"] == "first" and v1["residency"] in ("cpu", "disk") and len(v1["sha256"]) == 64
    v2 = upload(http, "ops", tiny_dirs["adapters"] / "soft").json()
    assert (v2["version"], v2["kind"], v2["num_virtual_tokens"]) == (2, "prompt_tuning", 6)
    assert "ops" in {m.id for m in client.models.list()}
    assert complete(client, "ops")[0] == "ops@2"
    assert complete(client, "ops@1")[0] == "ops@1"
    shown = http.get("/v1/adapters/ops").json()
    assert shown["active_version"] == 2 and [v["version"] for v in shown["versions"]] == [1, 2]
    assert http.get("/v1/adapters/ops@1").json()["description"] == "first"
    promoted = http.post("/v1/adapters/ops/promote", json={"version": 1}).json()
    assert promoted["active_version"] == 1 and complete(client, "ops")[0] == "ops@1"
    assert http.delete("/v1/adapters/ops@1").json()["versions"] == [1]
    assert http.get("/v1/adapters/ops").json()["active_version"] == 2
    assert http.delete("/v1/adapters/ops").json() == {"object": "adapter.deleted", "name": "ops", "versions": [2],
                                                      "deleted": True, "active_version": None}
    assert_error(http.post("/v1/completions", json={"model": "ops", "prompt": "x", "max_tokens": 1}), 404,
                 param="model", match="'ops' does not exist")
    assert upload(http, "ops", tiny_dirs["adapters"] / "lora-attn").json()["version"] == 3  # numbers not reused


def test_import_by_path_under_the_root_only(http, client, tiny_dirs, roots):
    root, outside = roots
    inside = shutil.copytree(tiny_dirs["adapters"] / "lora-tmpl", root / "tmpl")
    r = http.post("/v1/adapters", json={"name": "imported", "path": str(inside), "description": "by path"})
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "import" and r.json()["source_detail"] == {"path": str(inside)}
    assert complete(client, "imported")[0] == "imported@1"
    before = state(http)
    away = shutil.copytree(tiny_dirs["adapters"] / "lora-attn", outside / "away", dirs_exist_ok=True)
    assert_error(http.post("/v1/adapters", json={"name": "x", "path": str(away)}), 403, param="path",
                 match="not under an import root")
    assert_error(http.post("/v1/adapters", json={"name": "x", "path": str(root / ".." / away.parent.name / "away")}),
                 403, param="path")
    (root / "link").unlink(missing_ok=True)
    (root / "link").symlink_to(away, target_is_directory=True)
    assert_error(http.post("/v1/adapters", json={"name": "x", "path": str(root / "link")}), 403, param="path")
    sneaky = root / "sneaky"
    sneaky.mkdir(exist_ok=True)
    shutil.copy(away / "adapter_config.json", sneaky)
    (sneaky / "adapter_model.safetensors").unlink(missing_ok=True)
    (sneaky / "adapter_model.safetensors").symlink_to(away / "adapter_model.safetensors")
    assert_error(http.post("/v1/adapters", json={"name": "x", "path": str(sneaky)}), 403, param="path",
                 match="symlink that leaves")
    assert_error(http.post("/v1/adapters", json={"name": "x", "path": "relative/dir"}), 400, param="path")
    assert_error(http.post("/v1/adapters", json={"name": "x", "path": str(root) + "\x00x"}), 400, param="path")
    assert state(http) == before


def _bad_uploads(tiny_dirs, tmp_path):
    """name -> (adapter name, folder, upload kwargs, status, param, message part)."""
    src = tiny_dirs["adapters"]

    def variant(name, base="lora-attn", config=None, tensors=None):
        folder = shutil.copytree(src / base, tmp_path / name)
        if config:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps(cfg | config))
        if tensors:
            save_file(tensors(load_file(folder / "adapter_model.safetensors")), folder / "adapter_model.safetensors")
        return folder

    attn = src / "lora-attn"
    weights = (attn / "adapter_model.safetensors").read_bytes()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    r16 = tiny.save_lora(tiny_dirs["base"], tmp_path / "r16", r=16, targets=["q_proj"], seed=9)
    return {
        "pickle": ("bad", attn, {"extra": {"adapter_model.bin": b"\x80\x04."}}, 400, "adapter_model.bin", "pickle"),
        "truncated": ("bad", attn, {"skip": ("adapter_model.safetensors",),
                                    "extra": {"adapter_model.safetensors": weights[: len(weights) // 2]}},
                      400, None, "not a readable safetensors file"),
        "garbage": ("bad", attn, {"skip": ("adapter_model.safetensors",),
                                  "extra": {"adapter_model.safetensors": b"not safetensors at all"}},
                    400, None, "not a readable safetensors file"),
        "shape": ("bad", variant("shape", tensors=lambda t: t | {key: torch.zeros(8, 7)}), {}, 400, None,
                  "lora_A (8, 7)"),
        "extra-key": ("bad", variant("extra-key", tensors=lambda t: t | {"base_model.model.lm_head.weight":
                                                                         torch.zeros(2, 2)}), {}, 400, None,
                      "lm_head.weight"),
        "missing-key": ("bad", variant("missing-key", tensors=lambda t: {k: v for k, v in t.items() if k != key}),
                        {}, 400, None, "missing"),
        "foreign": ("bad", variant("foreign", config={"base_model_name_or_path": "meta-llama/Llama-3-8B"}), {}, 409,
                    None, "--allow-foreign-base"),
        "rank": ("bad", r16, {}, 400, None, "--max-lora-rank 16"),
        "nan": ("bad", variant("nan", tensors=lambda t: t | {key: torch.full_like(t[key], float("nan"))}), {}, 400,
                None, "NaN or Inf"),
        "type": ("bad", variant("type", config={"peft_type": "IA3"}), {}, 400, None, "unsupported adapter type"),
        "too-large": ("bad", src / "lora-mlp", {}, 413, "adapter_model.safetensors", "--max-adapter-bytes"),
        "no-weights": ("bad", attn, {"skip": ("adapter_model.safetensors",)}, 400, "adapter_model.safetensors",
                       "missing file"),
        "stray-file": ("bad", attn, {"extra": {"run.sh": b"echo"}}, 400, "run.sh", "unexpected file"),
        **{f"name-{i}": (bad_name, attn, {}, 400, "name", "invalid adapter name")
           for i, bad_name in enumerate(["Upper", "-x", "a/b", "a..b", "a\x00b", "x" * 65, "..", ""])},
    }


def test_bad_uploads_are_refused_and_change_nothing(http, client, tiny_dirs, tmp_path):
    assert upload(http, "steady", tiny_dirs["adapters"] / "lora-attn").status_code == 201
    expected = complete(client, "steady")
    before = state(http)
    for case, (name, folder, kw, status, param, match) in _bad_uploads(tiny_dirs, tmp_path).items():
        r = upload(http, name, folder, **kw)
        err = assert_error(r, status, param=param, match=match)
        assert err["message"], case
        assert state(http) == before, case
    assert complete(client, "steady") == expected  # traffic to the others is unaffected


def test_two_clients_registering_one_name_get_consecutive_versions(server, tiny_dirs):
    results = []

    def worker(folder):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for _ in range(3):  # the same content again: a copy only because it is asked for
                results.append(upload(c, "race", folder, force_new_version=True))

    threads = [threading.Thread(target=worker, args=(tiny_dirs["adapters"] / n,)) for n in ("lora-attn", "soft")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r.status_code == 201 for r in results), [r.text for r in results]
    assert sorted(r.json()["version"] for r in results) == list(range(1, 7))
    with httpx.Client(base_url=server.url) as c:
        listed = {v["version"]: v["sha256"] for v in c.get("/v1/adapters/race").json()["versions"]}
    assert listed == {r.json()["version"]: r.json()["sha256"] for r in results}


def test_load_pin_and_unload(http, client, tiny_dirs):
    upload(http, "res", tiny_dirs["adapters"] / "lora-attn")
    http.post("/v1/adapters/res/unload", json={})
    assert http.get("/v1/adapters/res@1").json()["residency"] == "disk"
    loaded = http.post("/v1/adapters/res/load", json={"pin": True}).json()
    assert loaded == {"name": "res", "version": 1, "residency": "device", "pinned": True, "changed": True}
    assert http.post("/v1/adapters/res/load", json={}).json()["changed"] is False  # idempotent, says so
    assert http.get("/v1/adapters/res@1").json()["pinned"] is True
    assert complete(client, "res")[0] == "res@1"
    out = http.post("/v1/adapters/res/unload").json()
    assert out == {"name": "res", "version": 1, "residency": "disk", "pinned": False, "changed": True}
    assert http.post("/v1/adapters/res/unload").json()["changed"] is False
    assert complete(client, "res")[0] == "res@1"  # the first request loads it from disk again
    assert_error(http.post("/v1/adapters/res/load", json={"version": 7}), 404, param="name", match="no version 7")
    assert_error(http.post("/v1/adapters/nope/load", json={}), 404)
    assert_error(http.post("/v1/adapters/res/load", json={"pin": "maybe"}), 400, param="pin")


def test_merge_endpoint_and_per_request_mix_agree(http, client, tiny_dirs, extra_adapters):
    upload(http, "ma", tiny_dirs["adapters"] / "lora-attn")
    upload(http, "mb", extra_adapters["lora-qk"])
    sources = [{"name": "ma", "weight": 0.7}, {"name": "mb@1", "weight": 0.3}]
    merged = http.post("/v1/adapters/merge", json={"name": "mab", "sources": sources, "strategy": "linear"})
    assert merged.status_code == 201, merged.text
    m = merged.json()
    assert m["source"] == "merge" and m["rank"] == 8
    assert m["source_detail"]["sources"] == [{"name": "ma@1", "weight": 0.7}, {"name": "mb@1", "weight": 0.3}]
    key, text = complete(client, "base", adapters=sources)
    assert key.startswith("mix:") and complete(client, "base", adapters=sources) == (key, text)  # cached by recipe
    assert complete(client, "mab")[1] == text  # the registered merge and the mix are the same adapter
    assert complete(client, "ma")[1] != text
    assert complete(client, "base", adapters=sources, merge_strategy="svd")[0] != key
    assert_error(http.post("/v1/completions", json={"model": "base", "prompt": "x", "adapters": sources,
                                                    "merge_strategy": "cat"}), 400, param="adapters",
                 match="LoRA rank 16 is greater than max_lora_rank 8")  # 8 + 8 on a server limited to 8
    upload(http, "ma", tiny_dirs["adapters"] / "lora-tmpl")  # a new version of a source: a new mix
    assert complete(client, "base", adapters=sources)[0] != key
    before = state(http)
    r = http.post("/v1/completions", json={"model": "ma", "prompt": "x", "adapters": sources})
    assert_error(r, 400, param="adapters", match="set model to 'base'")
    soft = upload(http, "msoft", tiny_dirs["adapters"] / "soft").json()
    before = state(http)
    assert_error(http.post("/v1/completions", json={"model": "base", "prompt": "x", "adapters": [
        {"name": "ma", "weight": 1}, {"name": "msoft", "weight": 1}]}), 400, param="adapters",
        match="prompt_tuning")
    assert_error(http.post("/v1/completions", json={"model": "base", "prompt": "x", "merge_strategy": "ties",
                                                    "adapters": sources}), 400, param="adapters", match="density")
    assert_error(http.post("/v1/completions", json={"model": "base", "prompt": "x", "merge_strategy": "avg",
                                                    "adapters": sources}), 400, param="merge_strategy")
    assert_error(http.post("/v1/adapters/merge", json={"name": "m2", "sources": [{"name": "nope", "weight": 1}]}),
                 404, param="sources")
    assert_error(http.post("/v1/adapters/merge", json={"name": "Bad", "sources": sources}), 400, param="name")
    assert soft["kind"] == "prompt_tuning" and state(http) == before


def test_deleting_an_adapter_lets_running_requests_finish(server, http, client, tiny_dirs):
    upload(http, "doomed", tiny_dirs["adapters"] / "lora-attn")
    stream = client.completions.create(model="doomed", prompt=PROMPT, max_tokens=64, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert http.delete("/v1/adapters/doomed").status_code == 200
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"
    assert len(first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)) > 0
    assert_error(http.post("/v1/completions", json={"model": "doomed", "prompt": "x", "max_tokens": 1}), 404)


def test_the_same_content_again_is_the_version_that_has_it(http, tiny_dirs):
    first = upload(http, "again", tiny_dirs["adapters"] / "lora-attn")
    assert first.status_code == 201 and first.json()["unchanged"] is False
    second = upload(http, "again", tiny_dirs["adapters"] / "soft")
    assert second.status_code == 201 and second.json()["version"] == 2
    same = upload(http, "again", tiny_dirs["adapters"] / "soft", description="ignored: nothing new is stored")
    assert same.status_code == 200, same.text
    assert (same.json()["version"], same.json()["unchanged"], same.json()["active"]) == (2, True, True)
    older = upload(http, "again", tiny_dirs["adapters"] / "lora-attn")  # v1's content: v1 becomes active again
    assert older.status_code == 200 and (older.json()["version"], older.json()["active"]) == (1, True)
    shown = http.get("/v1/adapters/again").json()
    assert shown["active_version"] == 1 and [v["version"] for v in shown["versions"]] == [1, 2]
    forced = upload(http, "again", tiny_dirs["adapters"] / "lora-attn", force_new_version=True)
    assert forced.status_code == 201 and (forced.json()["version"], forced.json()["unchanged"]) == (3, False)
    assert forced.json()["sha256"] == older.json()["sha256"]
    files = [("files", (f.name, f.read_bytes())) for f in sorted((tiny_dirs["adapters"] / "lora-attn").iterdir())]
    bad = http.post("/v1/adapters", data={"name": "again", "force_new_version": "perhaps"}, files=files)
    assert_error(bad, 400, param="force_new_version", match="true or false")
    deleted = http.delete("/v1/adapters/again@3").json()  # the active one: the newest left becomes active
    assert (deleted["versions"], deleted["active_version"]) == ([3], 2)


def test_hot_swap_under_load_never_fails_and_never_mixes_versions(server, http, client, tiny_dirs, tmp_path):
    from openai import OpenAI

    folders = [lora_folder(tmp_path, tiny_dirs, f"v{i}", seed=100 + i) for i in range(11)]
    expected: dict[str, str] = {}

    def register(folder) -> str:
        r = upload(http, "hs", folder)
        assert r.status_code == 201, r.text
        key = f"hs@{r.json()['version']}"
        expected[key] = complete(client, key, max_tokens=12)[1]
        return key

    register(folders[0])
    stop = threading.Event()
    seen, failures = [], []

    def stream_forever():
        c = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for _ in range(500):  # bounded; stops when told
            if stop.is_set():
                return
            try:
                with c.completions.with_streaming_response.create(
                        model="hs", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                        extra_body={"ignore_eos": True}) as resp:
                    key = resp.headers["x-hotpeft-adapter"]
                    text = "".join(ch.choices[0].text for ch in resp.parse() if ch.choices)
                seen.append((key, text))
            except Exception as e:  # noqa: BLE001 - counted, asserted zero
                failures.append(repr(e))

    threads = [threading.Thread(target=stream_forever) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        for folder in folders[1:]:
            register(folder)
        assert http.post("/v1/adapters/hs/promote", json={"version": 1}).status_code == 200
        after_rollback = len(seen)
        while len(seen) < after_rollback + 16 and not failures and all(t.is_alive() for t in threads):
            stop.wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert failures == []
    assert len(expected) == 11 and len(set(expected.values())) > 1
    for key, text in seen:
        assert text == expected[key], key  # wholly one version's output
    assert len({k for k, _ in seen}) >= 2 and len(seen) >= 32
    assert complete(client, "hs", max_tokens=12) == ("hs@1", expected["hs@1"])  # rolled back


def test_cli_does_every_operation(server, tiny_dirs, extra_adapters, roots):
    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "hotpeft.cli", "adapters", "--url", server.url, "--json", *args],
                           capture_output=True, text=True, timeout=120)
        return r.returncode, (json.loads(r.stdout) if r.returncode == 0 else r.stderr)

    code, out = cli("add", "cli-a", str(tiny_dirs["adapters"] / "lora-attn"), "--description", "from the shell")
    assert code == 0 and (out["name"], out["version"], out["description"]) == ("cli-a", 1, "from the shell")
    inside = shutil.copytree(extra_adapters["lora-qk"], roots[0] / "cli-qk")
    code, out = cli("add", "cli-a", str(inside), "--by-path")
    assert code == 0 and (out["version"], out["source"]) == (2, "import")
    code, out = cli("list")
    assert code == 0 and "cli-a" in {a["name"] for a in out["data"]} and "tiers" in out
    code, out = cli("show", "cli-a@1")
    assert code == 0 and out["description"] == "from the shell"
    code, out = cli("load", "cli-a", "--version", "1", "--pin")
    assert code == 0 and (out["residency"], out["pinned"]) == ("device", True)
    code, out = cli("unload", "cli-a", "--version", "1")
    assert code == 0 and out["residency"] == "disk"
    code, out = cli("promote", "cli-a", "1")
    assert code == 0 and out["active_version"] == 1
    code, out = cli("merge", "cli-m", "cli-a@1=0.5", "cli-a@2=0.5", "--strategy", "svd")
    assert code == 0 and out["source"] == "merge" and out["rank"] == 8
    code, out = cli("rm", "cli-a@2")
    assert code == 0 and out["versions"] == [2]
    code, err = cli("rm", "cli-a@2")
    assert code == 1 and "404" in err and "no version 2" in err
    code, err = cli("add", "cli-b", str(tiny_dirs["adapters"] / "lora-mlp"))
    assert code == 1 and "413" in err and "--max-adapter-bytes" in err


def test_two_hundred_adapters_keep_memory_bounded(tiny_dirs, tmp_path):
    one = lora_folder(tmp_path, tiny_dirs, "probe", seed=0)
    weights = sum(t.numel() * 4 for t in load_file(one / "adapter_model.safetensors").values())
    cpu_max, device_max = 12 * weights, 6 * weights
    s = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32",
                       "--max-cpu-adapter-bytes", str(cpu_max), "--max-resident-adapter-bytes", str(device_max)],
                      tmp_path / "home")
    try:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            for i in range(200):
                assert upload(c, f"many-{i}", lora_folder(tmp_path, tiny_dirs, f"m{i}", seed=i)).status_code == 201
            for i in range(200):
                r = c.post("/v1/completions", json={"model": f"many-{i}", "prompt": "x", "max_tokens": 2})
                assert r.status_code == 200 and r.headers["x-hotpeft-adapter"] == f"many-{i}@1"
            listed = c.get("/v1/adapters").json()
        tiers = listed["tiers"]
        assert len(listed["data"]) == 200
        assert 0 < tiers["cpu_bytes"] <= cpu_max and 0 < tiers["device_bytes"] <= device_max
        where = [a["versions"][0]["residency"] for a in listed["data"]]
        assert where.count("device") <= 6 and where.count("disk") >= 200 - 12
    finally:
        s.stop()


def test_a_second_server_sharing_the_registry_serves_new_adapters(tiny_dirs, tmp_path, postgres_server):
    url = postgres_server()
    common = ["--model", str(tiny_dirs["base"]), "--dtype", "float32", "--registry-url", url,
              "--store-dir", str(tmp_path / "shared-store")]
    a = ServerProcess(common, tmp_path / "home-a")
    b = ServerProcess(common, tmp_path / "home-b")
    try:
        with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
            assert upload(ca, "shared", tiny_dirs["adapters"] / "lora-attn").status_code == 201
            body = {"model": "shared", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
            for _ in range(100):  # the watcher polls every 0.5 s; bounded wait
                r = cb.post("/v1/completions", json=body)
                if r.status_code == 200:
                    break
                threading.Event().wait(0.1)
            assert r.status_code == 200 and r.headers["x-hotpeft-adapter"] == "shared@1"
            assert r.json()["choices"][0]["text"] == ca.post("/v1/completions", json=body).json()["choices"][0]["text"]
            assert cb.delete("/v1/adapters/shared").status_code == 200
            for _ in range(100):
                if ca.post("/v1/completions", json=body).status_code == 404:
                    break
                threading.Event().wait(0.1)
            assert ca.post("/v1/completions", json=body).status_code == 404
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("point", ["store.before-rename", "store.after-rename", "registry.before-commit"])
def test_killed_mid_registration_leaves_it_wholly_absent(tiny_dirs, tmp_path, point):
    from hotpeft.adapters import AdapterRegistry, AdapterStore

    home = tmp_path / "home"
    args = ["--model", str(tiny_dirs["base"]), "--dtype", "float32"]
    first = ServerProcess(args, home)
    with httpx.Client(base_url=first.url, timeout=60) as c:
        assert upload(c, "kept", tiny_dirs["adapters"] / "lora-attn").status_code == 201
    first.stop()
    doomed = ServerProcess(args, home, env={"HOTPEFT_FAILPOINT": point})
    with httpx.Client(base_url=doomed.url, timeout=60) as c, pytest.raises(httpx.TransportError):
        upload(c, "victim", tiny_dirs["adapters"] / "lora-mlp")
    assert doomed.proc.wait(30) == -9  # SIGKILL: no clean-up of any kind ran
    doomed.stop()
    again = ServerProcess(args, home)
    try:
        with httpx.Client(base_url=again.url, timeout=60) as c:
            assert set(state(c)) == {"kept"}
            assert c.post("/v1/completions", json={"model": "kept", "prompt": "x", "max_tokens": 2}).status_code == 200
            assert_error(c.post("/v1/completions", json={"model": "victim", "prompt": "x", "max_tokens": 1}), 404)
            assert upload(c, "victim", tiny_dirs["adapters"] / "lora-mlp").json()["version"] == 1
    finally:
        again.stop()
    store = AdapterStore(home / "store")
    assert not any(store.staging_root.iterdir())  # a dead process's staging is cleared at open
    registry = AdapterRegistry(f"sqlite:///{home / 'registry.db'}")
    referenced = {r.store_key for r in registry.snapshot().records()}
    registry.close()
    assert referenced <= set(store.keys())  # every version's weights are there
    store.collect_garbage(referenced, grace_s=0)  # an orphan from a kill after the rename is collectable
    assert set(store.keys()) == referenced
    assert os.path.isdir(home / "store" / "objects")


def test_servers_without_a_shared_folder_share_adapters_through_a_store_url(tiny_dirs, tmp_path):
    """Two servers, each with its own home and local store, one registry and one --store-url: an
    adapter uploaded to one is served by the other, fetched from the shared store."""
    from conftest import ServerProcess

    shared = ["--model", str(tiny_dirs["base"]), "--dtype", "float32", "--registry-url",
              f"sqlite:///{tmp_path / 'registry.db'}", "--store-url", f"file://{tmp_path / 'bucket'}"]
    servers = [ServerProcess(shared, tmp_path / f"home-{i}") for i in range(2)]
    try:
        a, b = servers
        folder = tiny_dirs["adapters"] / "lora-mlp"
        files = [("files", (f.name, f.read_bytes())) for f in folder.iterdir() if f.is_file()]
        r = httpx.post(a.url + "/v1/adapters", data={"name": "via-url"}, files=files, timeout=60)
        assert r.status_code == 201, r.text
        body = {"model": "via-url", "prompt": "count", "max_tokens": 6, "temperature": 0}
        want = httpx.post(a.url + "/v1/completions", json=body, timeout=60)
        from conftest import wait_for

        # b sees the registration at its next poll of the registry (0.5 s)
        got = wait_for(lambda: (r := httpx.post(b.url + "/v1/completions", json=body, timeout=60)).status_code == 200
                       and r, 10, what="the other server serving the adapter")
        assert got.headers["x-hotpeft-adapter"] == "via-url@1", got.text
        assert got.json()["choices"][0]["text"] == want.json()["choices"][0]["text"]
        assert list((tmp_path / "home-1" / "store" / "objects").glob("*/*/manifest.json"))  # b's local copy
    finally:
        for s in servers:
            s.stop()


def test_cli_answers_in_words_and_tables_naming_what_changed(server, tiny_dirs, extra_adapters):
    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "hotpeft.cli", "adapters", *args, "--url", server.url],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    attn, r4 = tiny_dirs["adapters"] / "lora-attn", extra_adapters["lora-r4"]
    assert cli("add", "words", str(attn)) == "registered words@1 (lora, rank 8, " \
        f"{cli_size(attn)}); it is the active version"
    assert cli("add", "words", str(r4)).startswith("registered words@2 (lora, rank 4, ")
    again = cli("add", "words", str(r4))
    assert again.startswith("unchanged: words@2 already has this content") and "--force-new-version" in again
    assert cli("add", "words", str(r4), "--force-new-version").startswith("registered words@3 ")
    listing = cli("list").splitlines()
    assert listing[0].split() == ["NAME", "VERSIONS", "ACTIVE", "KIND", "RANK", "SIZE", "RESIDENCY", "(active)"]
    row = next(line.split() for line in listing if line.startswith("words "))
    assert row[:5] == ["words", "1,2,3", "@3", "lora", "4"]
    assert any(line.startswith("device tier: ") for line in listing)
    shown = cli("show", "words").splitlines()
    assert shown[0] == "words (active @3, * below)" and shown[1].split()[:3] == ["VERSION", "KIND", "RANK"]
    assert cli("show", "words@1").splitlines()[0].split() == ["version", "words@1"]
    assert cli("rm", "words@3") == "deleted words@3; active is now words@2"
    assert cli("promote", "words", "1") == "active is now words@1"
    assert cli("load", "words", "--pin") == "words@1 is resident (device, pinned)"
    assert cli("load", "words") == "words@1 is resident (device, pinned); it already was"
    assert cli("unload", "words") == "words@1 unloaded (now disk)"
    assert cli("rm", "words") == "deleted words@1, words@2; no version of words is left"


def cli_size(folder: Path) -> str:
    from hotpeft.cli.views import size

    stored = ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja")
    return size(sum((folder / f).stat().st_size for f in stored if (folder / f).is_file()))
