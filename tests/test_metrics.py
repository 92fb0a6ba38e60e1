"""`GET /metrics`: per-adapter Prometheus metrics that agree with what the API answered."""
from __future__ import annotations

import httpx
import openai
import pytest
from conftest import ServerProcess, wait_for
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of every sample."""
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        assert family.name.startswith("hotpeft_"), family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counts_and_tokens_match_the_requests_made(tiny_server, client):
    base = "tiny-llama"
    before = scrape(tiny_server.url)
    usage = {base: [0, 0], "lora-attn": [0, 0], "soft": [0, 0]}
    made = {base: 0, "lora-attn": 0, "soft": 0}
    for model in usage:
        for i in range(3 if model == "lora-attn" else 2):
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"hi {i}"}],
                                               max_tokens=5)
            usage[model][0] += r.usage.prompt_tokens
            usage[model][1] += r.usage.completion_tokens
            made[model] += 1
        stream = client.completions.create(model=model, prompt="count:", max_tokens=4, stream=True,
                                           stream_options={"include_usage": True})
        last = [c for c in stream][-1]
        usage[model][0] += last.usage.prompt_tokens
        usage[model][1] += last.usage.completion_tokens
    after = scrape(tiny_server.url)
    for model, n in made.items():
        assert delta(before, after, "hotpeft_requests_total", adapter=model, endpoint="chat", outcome="ok") == n
        assert delta(before, after, "hotpeft_requests_total", adapter=model, endpoint="completions", outcome="ok") == 1
        assert delta(before, after, "hotpeft_time_to_first_token_seconds_count", adapter=model) == n + 1
        assert delta(before, after, "hotpeft_request_duration_seconds_count", adapter=model, endpoint="chat") == n
        assert delta(before, after, "hotpeft_queue_wait_seconds_count", adapter=model) == n + 1
        assert delta(before, after, "hotpeft_prompt_tokens_total", adapter=model) == usage[model][0]
        assert delta(before, after, "hotpeft_generation_tokens_total", adapter=model) == usage[model][1]
        assert delta(before, after, "hotpeft_request_generation_tokens_sum", adapter=model) == usage[model][1]
    assert delta(before, after, "hotpeft_engine_step_duration_seconds_count") > 0
    assert after[("hotpeft_requests_running", ())] == 0 and after[("hotpeft_requests_waiting", ())] == 0
    assert after[("hotpeft_kv_cache_used_bytes", ())] == 0 < after[("hotpeft_kv_cache_budget_bytes", ())]
    info = [k for k in after if k[0] == "hotpeft_build_info"]
    assert len(info) == 1 and ("base_model", base) in info[0][1] and ("quantization", "none") in info[0][1]


def test_unknown_names_never_become_label_values(tiny_server, client):
    before = scrape(tiny_server.url)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter-x1", messages=[{"role": "user", "content": "x"}])
    text = httpx.get(tiny_server.url + "/metrics").text
    assert "no-such-adapter-x1" not in text
    after = scrape(tiny_server.url)
    assert delta(before, after, "hotpeft_requests_total", adapter="unknown", endpoint="chat",
                 outcome="client_error") == 1


def test_cancelled_and_rejected_are_counted_and_labels_are_bounded(tiny_dirs, tmp_path):
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32", "--adapters-dir",
                            str(tiny_dirs["adapters"]), "--max-num-seqs", "1", "--max-queue", "1",
                            "--metrics-max-adapters", "1"], tmp_path / "home")
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        # bounded labels: the first adapter name gets its own label, the next ones are "other"
        c.completions.create(model="lora-attn", prompt="a", max_tokens=2)
        c.completions.create(model="lora-mlp", prompt="a", max_tokens=2)
        c.completions.create(model="soft", prompt="a", max_tokens=2)
        after = scrape(server.url)
        assert delta({}, after, "hotpeft_requests_total", adapter="lora-attn", endpoint="completions", outcome="ok") == 1
        assert delta({}, after, "hotpeft_requests_total", adapter="other", endpoint="completions", outcome="ok") == 2
        # two LoRAs went into the engine (misses, loads); the CPU tier held all three since registration
        device = (("tier", "device"),)
        assert after[("hotpeft_adapter_loads_total", device)] == 2
        assert after[("hotpeft_adapter_cache_misses_total", device)] == 2
        assert after[("hotpeft_adapter_cache_hits_total", (("tier", "cpu"),))] == 3
        assert after[("hotpeft_resident_adapters", device)] == 2
        assert after[("hotpeft_resident_adapter_bytes", device)] > 0
        # one running, one waiting, the third refused (429): rejected
        long = [c.completions.create(model="tiny-llama", prompt="a", max_tokens=200, stream=True,
                                     extra_body={"ignore_eos": True}) for _ in range(2)]
        next(iter(long[0]))
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="tiny-llama", prompt="a", max_tokens=2)
        for s in long:  # clients that leave mid-stream: cancelled
            s.response.close()
        wait_for(lambda: delta({}, scrape(server.url), "hotpeft_requests_total", adapter="tiny-llama",
                               endpoint="completions", outcome="cancelled") == 2, 30, what="2 cancelled requests")
        final = scrape(server.url)
        assert delta({}, final, "hotpeft_requests_total", adapter="tiny-llama", endpoint="completions",
                     outcome="rejected") == 1
        wait_for(lambda: scrape(server.url)[("hotpeft_requests_running", ())] == 0, 30, what="no request running")
    finally:
        server.stop()
