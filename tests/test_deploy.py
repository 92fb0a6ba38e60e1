"""deploy/: Prometheus scrape config and alert rules (promtool), a real Prometheus scraping a test
server and answering p95 TTFT per adapter, and the Grafana dashboard's queries against /metrics."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import prometheus_scraping, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"\bhotpeft_[a-z_]+")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package prometheus; scripts/install.sh --test installs it "
                    "where apt-get can)")
    return path


def _exported(url: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.parametrize("args", [["check", "config", "prometheus/prometheus.yml"],
                                  ["check", "rules", "prometheus/alerts.yml"]])
def test_promtool_accepts_the_config_and_rules(args):
    done = subprocess.run([_tool("promtool"), *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_metric_the_dashboard_and_alerts_query_exists(tiny_server, client):
    client.completions.create(model="lora-attn", prompt="x", max_tokens=2)  # histograms get their first samples
    exported = _exported(tiny_server.url)
    board = json.loads((DEPLOY / "grafana/dashboards/hotpeft.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert len(board["panels"]) >= 10 and all(p["datasource"]["uid"] == "prometheus" for p in board["panels"])
    used = {m for e in exprs for m in METRIC.findall(e)}
    used |= set(METRIC.findall((DEPLOY / "prometheus/alerts.yml").read_text()))
    used |= set(METRIC.findall(board["templating"]["list"][0]["query"]["query"]))
    missing = used - exported
    assert not missing, f"queried but not exported: {sorted(missing)}"
    assert any("histogram_quantile(0.95" in e and "hotpeft_time_to_first_token_seconds_bucket" in e for e in exprs)


def test_a_real_prometheus_scrapes_and_answers_p95_ttft_per_adapter(tiny_server, client, tmp_path):
    with prometheus_scraping(tiny_server, tmp_path, _tool("prometheus")) as (query, api):
        time.sleep(1.5)  # one scrape before the traffic, so that rate() sees it
        for _ in range(3):
            for model in ("tiny-llama", "lora-attn", "soft"):
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3)
            time.sleep(0.5)
        p95 = ("histogram_quantile(0.95, sum by (adapter, le) "
               "(rate(hotpeft_time_to_first_token_seconds_bucket[1m])))")
        result = wait_for(lambda: (r := query(p95)) and {"tiny-llama", "lora-attn", "soft"} <= {
            x["metric"]["adapter"] for x in r if x["value"][1] != "NaN"} and r, 30, what="p95 TTFT for each adapter")
        values = {x["metric"]["adapter"]: float(x["value"][1]) for x in result if x["value"][1] != "NaN"}
        assert all(0 < values[a] < 120 for a in ("tiny-llama", "lora-attn", "soft"))
        rules = httpx.get(api + "/rules").json()["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} >= {"HotpeftTTFTHigh", "HotpeftQueueGrowing", "HotpeftAdapterLoadFailures"}
        assert all(r["health"] != "err" for r in rules), rules  # "unknown" until their first evaluation


def _lint_tool(name: str) -> str:
    import sys

    path = Path(sys.executable).parent / name
    if not path.exists() and shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (pip install -e .[test])")
    return str(path) if path.exists() else shutil.which(name)


def test_dockerfile_passes_hadolint():
    out = subprocess.run([_lint_tool("hadolint"), str(DEPLOY.parent / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_deploy_yaml_passes_yamllint():
    config = "{extends: relaxed, rules: {line-length: {max: 120}}}"
    out = subprocess.run([_lint_tool("yamllint"), "-s", "-d", config, str(DEPLOY)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_manifests_validate():
    manifests = sorted((DEPLOY / "k8s").glob("*.yaml"))
    assert manifests
    out = subprocess.run([_lint_tool("kubernetes-validate"), *map(str, manifests)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    import yaml

    docs = [d for m in manifests for d in yaml.safe_load_all(m.read_text())]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service"} <= kinds
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "preStop" in container["lifecycle"]
