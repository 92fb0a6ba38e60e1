"""The built-in dashboard in headless Chromium (Debian's `chromium` driven by Playwright; no browser
download): it loads without console errors or outside requests, charts the adapters that got traffic, and shows
each version's evaluation figures with a button to promote it."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
QUALITY = "dash-quality"  # deleted again at the end of its test: test_api.py counts the tiny server's adapters


def _chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (scripts/install.sh --test installs it where apt-get can)")
    return path


def _metrics(rouge_l: float, retention: float, benchmark: float, tasks: tuple[str, ...] = ("summarize",)) -> dict:
    """A version's registry metrics as the trainer stores them, with retention, per-task and benchmark figures."""
    base = {"loss": 2.5, "rougeL": 0.2, "bleu": 10.0, "chrf": 30.0, "exact_match": 0.1}
    return {
        "base": base, "adapter": {**base, "loss": 1.25, "rougeL": rouge_l, "exact_match": 0.5},
        "training": {"method": "lora", "trainable_params": 12288},
        "retention": {"set": "general", "items": 40, "base": 0.9, "adapter": retention,
                      "drop": round(0.9 - retention, 4)},
        "tasks": {t: {"base": {"rougeL": 0.1}, "adapter": {"rougeL": rouge_l, "exact_match": 0.25}, "weight": 0.5}
                  for t in tasks},
        "benchmarks": {"arc_easy": {"metric": "acc", "adapter": benchmark, "base": 0.4, "samples": 200, "at": 1.7e9}},
    }


@contextmanager
def _dashboard(chromium: str, url: str, errors: list[str], outside: list[str]):
    """The dashboard open in headless Chromium; console errors and requests leaving `url` are collected."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
            page.goto(url + "/dashboard")
            yield page
        finally:
            browser.close()


def test_dashboard_data_has_every_adapter_with_traffic(tiny_server, client):
    for model in ("tiny-llama", "lora-attn", "soft"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    data = httpx.get(tiny_server.url + "/dashboard/data").json()
    assert {"tiny-llama", "lora-attn", "soft"} <= set(data["series"])
    bucket = data["series"]["lora-attn"][-1]
    assert bucket["requests"] >= 1 and bucket["ttft_p95_ms"] >= bucket["ttft_p50_ms"] > 0
    assert data["engine"]["running"] == 0 and data["tiers"]["device"]["adapters"] >= 1
    assert data["window_s"] == 600 and data["bucket_s"] == 10


def test_dashboard_in_headless_chromium(tiny_server, client):
    chromium = _chromium()
    for model in ("tiny-llama", "lora-attn", "soft"):
        for _ in range(2):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    errors: list[str] = []
    outside: list[str] = []
    with _dashboard(chromium, tiny_server.url, errors, outside) as page:
        page.wait_for_selector("#ttft path[data-adapter='soft']", state="attached", timeout=15000)
        drawn = set(page.eval_on_selector_all("#ttft path", "ps => ps.map(p => p.dataset.adapter)"))
        assert {"tiny-llama", "lora-attn", "soft"} <= drawn
        assert set(page.eval_on_selector_all("#tps path", "ps => ps.map(p => p.dataset.adapter)")) >= drawn
        assert page.inner_text("#running") == "0"
        assert "device" in page.inner_text("#tiers") and " ms" in page.text_content("#ttft")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        # the adapter filter keeps one adapter's lines
        page.select_option("#filter", "lora-attn")
        page.wait_for_function("() => [...document.querySelectorAll('#ttft path')]"
                               ".every(p => p.dataset.adapter === 'lora-attn')", timeout=10000)
        # it keeps refreshing on its own (every 2 s)
        first = page.inner_text("#status")
        page.wait_for_function(f"() => document.querySelector('#status').textContent !== {first!r}",
                               timeout=10000)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    assert errors == [] and outside == []


def test_dashboard_quality_panel_shows_each_version_and_promotes(tiny_server):
    """Two versions of one adapter with different evaluation figures, written to the registry the server watches
    (the API cannot set metrics): the panel shows both with their figures, marks the active one, and its Promote
    button moves the mark, as the server then has it too."""
    from dataclasses import fields

    chromium = _chromium()
    from conftest import wait_for

    from hotpeft.adapters.registry import AdapterRegistry, NewVersion

    registry = AdapterRegistry(f"sqlite:///{tiny_server.home / 'registry.db'}")
    try:
        snap = registry.snapshot()
        stored = snap.versions["lora-attn"][snap.active["lora-attn"]]  # weights already in the store to point at
        shared = {f.name: getattr(stored, f.name) for f in fields(NewVersion)} | {"source": "training",
                                                                                   "source_detail": None}
        for description, metrics in (("<b>first</b> & plain", _metrics(0.412, 0.85, 0.55)),
                                     ("second", _metrics(0.5, 0.7, 0.6))):
            registry.add_version(QUALITY, NewVersion(**shared | {"description": description, "metrics": metrics}))
    finally:
        registry.close()
    adapter_url = f"{tiny_server.url}/v1/adapters/{QUALITY}"
    errors: list[str] = []
    outside: list[str] = []
    try:
        # the server's registry watcher polls every 0.5 s
        wait_for(lambda: len(httpx.get(adapter_url).json().get("versions", [])) == 2, 15,
                 what=f"the server listing both versions of {QUALITY}")
        with _dashboard(chromium, tiny_server.url, errors, outside) as page:
            page.wait_for_selector(f"#quality-adapter option[value='{QUALITY}']", state="attached", timeout=15000)
            page.select_option("#quality-adapter", QUALITY)
            page.wait_for_selector("#quality tr[data-version='2'].active", timeout=10000)
            rows = {v: page.inner_text(f"#quality tr[data-version='{v}']") for v in (1, 2)}
            assert "<b>first</b> & plain" in rows[1]  # the description as text, not as markup
            assert "lora" in rows[1] and "12,288" in rows[1]
            assert "0.412 (+0.212)" in rows[1] and "0.500 (+0.300)" in rows[2]  # ROUGE-L and its change
            assert "1.250 (\u22121.250)" in rows[1]  # loss, lower than the base's
            assert "0.85 (\u22120.05)" in rows[1] and "0.70 (\u22120.20)" in rows[2]  # retention and its drop
            assert "summarize: rougeL 0.41 / em 0.25" in rows[1]
            assert "arc_easy acc 0.55 (base 0.40)" in rows[1] and "arc_easy acc 0.60 (base 0.40)" in rows[2]
            assert page.inner_text("#quality tr[data-version='2'] td.forgot") == "0.70 (\u22120.20)"
            assert page.query_selector("#quality tr[data-version='1'] td.forgot") is None  # a drop of 0.05
            assert page.eval_on_selector_all("#quality tr.active", "rs => rs.map(r => r.dataset.version)") == ["2"]
            assert "\u25cf active" in rows[2] and "active" not in rows[1]
            assert page.query_selector("#quality tr[data-version='2'] button") is None
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator("#quality-card").screenshot(path=str(ARTIFACTS / "dashboard-quality.png"))

            page.click("#quality tr[data-version='1'] button")
            page.wait_for_selector("#quality tr[data-version='1'].active", timeout=10000)
            assert page.eval_on_selector_all("#quality tr.active", "rs => rs.map(r => r.dataset.version)") == ["1"]
            assert "\u25cf active" in page.inner_text("#quality tr[data-version='1']")
            assert page.inner_text("#quality tr[data-version='2'] button") == "Promote"
            assert httpx.get(adapter_url).json()["active_version"] == 1
    finally:
        httpx.delete(adapter_url, timeout=30)
    assert QUALITY not in {m["id"] for m in httpx.get(tiny_server.url + "/v1/models").json()["data"]}
    assert errors == [] and outside == []


def test_dashboard_asks_for_a_key_when_the_server_has_keys(tiny_dirs, tmp_path):
    """The page is public; its data is not: it shows a key field, and with a good key it draws."""
    chromium = _chromium()
    from conftest import ServerProcess
    from playwright.sync_api import sync_playwright

    key = "dashboard-key-0001"
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--adapters-dir", str(tiny_dirs["adapters"]),
                            "--dtype", "float32"], tmp_path / "home", env={"HOTPEFT_API_KEY": key})
    try:
        httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": "lora-attn", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                listed: list[str] = []
                page.on("request", lambda r: listed.append(r.url) if r.url.endswith("/v1/adapters") else None)
                page.goto(server.url + "/dashboard")
                page.wait_for_selector("#login", state="visible", timeout=15000)
                assert "key is needed" in page.inner_text("#status")
                page.fill("#key", "not-the-key-000")
                page.click("#login button")
                page.wait_for_function("() => document.getElementById('status').textContent.includes('not accepted')",
                                       timeout=15000)
                page.fill("#key", key)
                page.click("#login button")
                page.wait_for_selector("#ttft path[data-adapter='lora-attn']", state="attached", timeout=15000)
                assert page.is_hidden("#login") and "updated" in page.inner_text("#status")
                # the adapter list is admin-only: the quality panel says so, and asks once per key, not every refresh
                page.wait_for_function("() => document.getElementById('quality-error').textContent"
                                       ".includes('needs an admin key')", timeout=15000)
                shown = page.inner_text("#status")
                page.wait_for_function(f"() => document.querySelector('#status').textContent !== {shown!r}",
                                       timeout=10000)
                assert len(listed) == 3, listed  # no key, the wrong key, the inference key
            finally:
                browser.close()
    finally:
        server.stop()


def test_dashboard_tables_fit_their_cards_at_1280_px(tiny_server, client):
    """With many big tiers' figures and ten training jobs (long names, every stage), no table is wider than its
    card and the page has no horizontal scroll bar, at 1280 px and wider."""
    import json

    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    client.chat.completions.create(model="lora-attn", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    data = httpx.get(tiny_server.url + "/dashboard/data").json()
    for tier in data["tiers"].values():
        tier.update(bytes=123_456_789_012, limit=987_654_321_098, loads=123456, evictions=654321, hits=98765432,
                    misses=12345678)
    data["jobs"] = [{"id": f"ftjob-{i:024d}", "adapter": f"support-summaries-lora-rank-16-{i:02d}", "method": "prompt_tuning",
                     "status": "running", "stage": "evaluating", "created_at": 0,
                     "progress": {"step": 7, "total_steps": 20, "train_loss": 1.2345, "eta_s": 12.5}} for i in range(10)]
    body = json.dumps(data)
    tasks = tuple(f"support-summaries-{i}-with-a-long-task-name" for i in range(4))
    versions = [{"version": v, "active": v == 3, "created": 1.7e9, "source": "training", "description": "x" * 200,
                 "metrics": _metrics(0.41234, 0.5, 0.55, tasks)} for v in range(1, 4)]
    adapters = json.dumps({"object": "list", "data": [{"name": "support-summaries-lora-rank-16", "active_version": 3,
                                                        "versions": versions}]})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            for width, height in ((1280, 800), (1600, 900)):
                page = browser.new_page(viewport={"width": width, "height": height})
                page.route("**/dashboard/data", lambda route: route.fulfill(status=200, body=body,
                                                                            content_type="application/json"))
                page.route("**/v1/adapters", lambda route: route.fulfill(status=200, body=adapters,
                                                                         content_type="application/json"))
                page.goto(tiny_server.url + "/dashboard")
                page.wait_for_function("() => document.querySelectorAll('#jobs tr').length === 11", timeout=15000)
                page.wait_for_function("() => document.querySelectorAll('#quality tr').length === 4", timeout=15000)
                widths = page.evaluate("""() => [...document.querySelectorAll('section table')].map(t => ({
                    id: t.id, table: t.getBoundingClientRect().width,
                    card: t.closest('section').clientWidth - 24}))""")
                assert len(widths) == 3 and all(w["table"] <= w["card"] + 0.5 for w in widths), (width, widths)
                assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), width
                if width == 1280:
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / "dashboard-1280.png"), full_page=True)
                page.close()
        finally:
            browser.close()
