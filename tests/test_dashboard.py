"""The built-in dashboard in headless Chromium (Debian's `chromium` driven by Playwright; no browser
download): it loads without console errors or outside requests and charts the adapters that got traffic."""
from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (scripts/install.sh --test installs it where apt-get can)")
    return path


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
    from playwright.sync_api import sync_playwright

    for model in ("tiny-llama", "lora-attn", "soft"):
        for _ in range(2):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    errors: list[str] = []
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(tiny_server.url) else outside.append(r.url))
            page.goto(tiny_server.url + "/dashboard")
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
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
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
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            for width, height in ((1280, 800), (1600, 900)):
                page = browser.new_page(viewport={"width": width, "height": height})
                page.route("**/dashboard/data", lambda route: route.fulfill(status=200, body=body,
                                                                            content_type="application/json"))
                page.goto(tiny_server.url + "/dashboard")
                page.wait_for_function("() => document.querySelectorAll('#jobs tr').length === 11", timeout=15000)
                widths = page.evaluate("""() => [...document.querySelectorAll('section table')].map(t => ({
                    id: t.id, table: t.getBoundingClientRect().width,
                    card: t.closest('section').clientWidth - 24}))""")
                assert len(widths) == 2 and all(w["table"] <= w["card"] + 0.5 for w in widths), (width, widths)
                assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), width
                if width == 1280:
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / "dashboard-1280.png"), full_page=True)
                page.close()
        finally:
            browser.close()
