"""Auth, walked over the app's own route table: a route added later is checked by the same test.

The guard denies by default (hotpeft.server.guard): with keys set, a route needs an admin key
unless it is listed as an inference route or a public one. The sets below are what we mean to
expose; a route that lands in a wider scope than listed here fails the test.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest
from conftest import ServerProcess

from hotpeft.server.guard import KeyRing, Scope

API_KEY, API_KEY_2, ADMIN_KEY = "inference-key-0001", "inference-key-0002", "admin-key-00000001"
WRONG_KEY = "wrong-key-CANARY-7731"

PUBLIC = {("GET", "/health"), ("GET", "/ready"), ("GET", "/dashboard"), ("GET", "/metrics")}
INFERENCE = {("GET", "/v1/models"), ("GET", "/v1/models/{model_id:path}"), ("POST", "/v1/chat/completions"),
             ("POST", "/v1/completions"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"),
             ("GET", "/redoc"), ("GET", "/dashboard/data")}


def _route_table() -> list[tuple[str, str]]:
    from hotpeft.server.app import create_app
    from hotpeft.server.config import Settings

    app = create_app(Settings(api_key=[API_KEY], admin_key=[ADMIN_KEY]))  # no lifespan: no model, just the table
    routes = set()

    def walk(entries, prefix: str) -> None:
        for route in entries:
            included = getattr(route, "original_router", None)  # FastAPI >= 0.16x keeps included routers nested
            if included is not None:
                walk(included.routes, prefix + route.include_context.prefix)
            else:
                for method in getattr(route, "methods", None) or {"GET"}:
                    if method != "HEAD":
                        routes.add((method, prefix + route.path))

    walk(app.routes, "")
    # The walk must see at least everything the schema documents.
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert documented <= {(m, re.sub(r":path}", "}", p)) for m, p in routes}, documented - routes
    return sorted(routes)


ROUTES = _route_table()


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "probe", path)


@pytest.fixture(scope="module")
def keyed(tiny_dirs, tmp_path_factory):
    # Keys through the environment (as the README advises): argv is readable by every local user.
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--adapters-dir", str(tiny_dirs["adapters"]),
                            "--dtype", "float32"], tmp_path_factory.mktemp("keyed-home"),
                           env={"HOTPEFT_API_KEY": f"{API_KEY},{API_KEY_2}", "HOTPEFT_ADMIN_KEY": ADMIN_KEY})
    yield server
    server.stop()


def test_the_route_table_is_what_we_expect_to_see(figure):
    table = set(ROUTES)
    assert PUBLIC <= table and INFERENCE <= table
    assert ("POST", "/v1/adapters") in table and ("POST", "/v1/fine_tuning/jobs") in table
    admin = table - PUBLIC - INFERENCE
    figure("auth", routes=len(table), public=len(PUBLIC), inference=len(INFERENCE), admin=len(admin),
           requests_per_route=6)


@pytest.mark.parametrize("method,path", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_needs_the_right_key(keyed, method, path):
    url = keyed.url + _concrete(path)
    kwargs = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}

    def call(key: str | None, scheme: str = "Bearer") -> httpx.Response:
        headers = {"Authorization": f"{scheme} {key}"} if key else {}
        return httpx.request(method, url, headers=headers, timeout=30, **kwargs)

    expected = "public" if (method, path) in PUBLIC else "inference" if (method, path) in INFERENCE else "admin"
    for key, scheme in [(None, "Bearer"), (WRONG_KEY, "Bearer"), (ADMIN_KEY, "Basic")]:
        r = call(key, scheme)
        if expected == "public":
            assert r.status_code not in (401, 403), (key, r.text)
        else:
            assert r.status_code == 401, (key, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
            assert WRONG_KEY not in r.text
    for key in (API_KEY, API_KEY_2):
        r = call(key)
        if expected == "admin":
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "insufficient_permissions" and "--admin-key" in r.text
        else:
            assert r.status_code not in (401, 403), r.text
    assert call(ADMIN_KEY).status_code not in (401, 403)


def test_openai_client_with_each_key(keyed):
    from openai import AuthenticationError, OpenAI, PermissionDeniedError

    def client(key):
        return OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, timeout=60)

    for key in (API_KEY, ADMIN_KEY):
        out = client(key).chat.completions.create(model="lora-attn", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=3)
        assert out.usage.completion_tokens >= 1
    with pytest.raises(AuthenticationError):
        client(WRONG_KEY).models.list()
    with pytest.raises(PermissionDeniedError):  # files and fine-tuning jobs are admin routes
        client(API_KEY).files.list()
    with pytest.raises(PermissionDeniedError):
        client(API_KEY).fine_tuning.jobs.list()
    assert client(ADMIN_KEY).files.list().data == []


def test_a_refused_admin_call_changes_nothing(keyed, tiny_dirs):
    folder = tiny_dirs["adapters"] / "lora-attn"
    files = [("files", (f.name, f.read_bytes())) for f in folder.iterdir() if f.is_file()]
    for key in (None, WRONG_KEY, API_KEY):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(keyed.url + "/v1/adapters", data={"name": "sneaky"}, files=files, headers=headers, timeout=30)
        assert r.status_code in (401, 403)
    listed = httpx.get(keyed.url + "/v1/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()
    assert "sneaky" not in {a["name"] for a in listed["data"]}


def test_the_dashboard_page_is_public_but_its_data_needs_a_key(keyed):
    assert httpx.get(keyed.url + "/dashboard", timeout=30).status_code == 200
    assert httpx.get(keyed.url + "/dashboard/data", timeout=30).status_code == 401
    r = httpx.get(keyed.url + "/dashboard/data", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200 and "engine" in r.json() and "series" in r.json()


def test_no_key_appears_in_logs_or_metrics(keyed):
    for key in (API_KEY, WRONG_KEY, ADMIN_KEY):
        httpx.post(keyed.url + "/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {key}"}, timeout=30)
    seen = [keyed.log_text(), httpx.get(keyed.url + "/metrics", timeout=30).text,
            httpx.get(keyed.url + "/dashboard/data", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text,
            (keyed.home / "jobs.db").read_bytes().decode("latin-1") if (keyed.home / "jobs.db").exists() else ""]
    for text in seen:
        for secret in (API_KEY, API_KEY_2, ADMIN_KEY, WRONG_KEY):
            assert secret not in text


def test_keys_are_compared_whole():
    ring = KeyRing([API_KEY], [ADMIN_KEY])
    assert ring.scope_of(API_KEY) is Scope.INFERENCE and ring.scope_of(ADMIN_KEY) is Scope.ADMIN
    for wrong in (None, "", API_KEY[:-1], API_KEY + "x", API_KEY.upper(), ADMIN_KEY + " "):
        assert ring.scope_of(wrong) is None


def test_without_keys_a_remote_bind_is_refused(tiny_dirs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hotpeft.cli", "serve", "--model", str(tiny_dirs["base"]),
                           "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120,
                          env={"HOTPEFT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "--insecure-allow-remote" in proc.stderr and "--api-key" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hotpeft.cli", "serve", "--api-key", "short"],
                          capture_output=True, text=True, timeout=120, env={"HOTPEFT_HOME": str(tmp_path)})
    assert proc.returncode == 2 and "--api-key: keys must be at least 8 characters" in proc.stderr
    assert "short" not in proc.stderr.replace("keys must be", "")


def _adapters_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HOTPEFT_")}
    return subprocess.run([sys.executable, "-m", "hotpeft.cli", "adapters", *args], capture_output=True, text=True,
                          timeout=120, env=clean | (env or {}))


def test_the_adapters_cli_sends_a_key_and_names_the_flag_when_refused(keyed):
    no_key = _adapters_cli("list", "--url", keyed.url)
    assert no_key.returncode == 1 and "401" in no_key.stderr and "--api-key" in no_key.stderr
    not_admin = _adapters_cli("list", "--url", keyed.url, "--api-key", API_KEY)
    assert not_admin.returncode == 1 and "403" in not_admin.stderr and "not an admin key" in not_admin.stderr
    assert API_KEY not in not_admin.stderr + not_admin.stdout  # the key itself is never echoed
    ok = _adapters_cli("list", "--url", keyed.url, "--api-key", ADMIN_KEY)
    assert ok.returncode == 0 and "lora-attn" in ok.stdout
    # from the environment, as the server takes its keys
    assert _adapters_cli("show", "lora-attn", "--url", keyed.url, env={"HOTPEFT_API_KEY": ADMIN_KEY}).returncode == 0
    both = {"HOTPEFT_API_KEY": f"{API_KEY},{API_KEY_2}", "HOTPEFT_ADMIN_KEY": ADMIN_KEY}  # a shell that started the server
    assert _adapters_cli("show", "lora-attn", "--url", keyed.url, env=both).returncode == 0


@pytest.mark.parametrize("order", ["before", "after", "split"])
def test_the_adapters_cli_takes_its_options_before_or_after_the_operation(keyed, order):
    url, key = ["--url", keyed.url], ["--api-key", ADMIN_KEY]
    args = {"before": [*url, *key, "--json", "list"], "after": ["list", *url, *key, "--json"],
            "split": [*url, "--json", "list", *key]}[order]
    proc = _adapters_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "lora-attn" in {a["name"] for a in json.loads(proc.stdout)["data"]}


def test_an_option_after_the_operation_wins_over_the_one_before(keyed):
    proc = _adapters_cli("--url", "http://127.0.0.1:9", "list", "--url", keyed.url, "--api-key", ADMIN_KEY)
    assert proc.returncode == 0, proc.stderr
    wrong = _adapters_cli("--url", keyed.url, "list", "--url", "http://127.0.0.1:9")
    assert wrong.returncode == 1 and "cannot reach http://127.0.0.1:9" in wrong.stderr
