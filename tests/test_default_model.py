"""The real embedded default model (SmolLM2-135M-Instruct), converted once and served on 127.0.0.1."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from hotpeft.model.load import load_base
from hotpeft.model.source import DEFAULT_MODEL_ID, resolve_model

from conftest import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(model_home):
    return resolve_model("default", model_home)  # converts the GGUF on first use


@pytest.fixture(scope="module")
def server(source, model_home):
    s = ServerProcess([], model_home)  # every setting at its default: the README's first command
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_conversion_is_cached_once(source, model_home):
    weights = next(source.path.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    again = resolve_model(DEFAULT_MODEL_ID, model_home)
    assert again.path == source.path and next(again.path.glob("*.safetensors")).stat().st_mtime_ns == stamp
    assert source.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_models_reports_precision_and_bytes(client, server):
    base = client.models.list().data[0]
    assert base.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base.model_extra["precision"] in ("bfloat16", "float32", "nf4")
    assert 50e6 < base.model_extra["resident_bytes"] < 600e6
    assert "resident on" in server.log_text() and "MiB" in server.log_text()


def test_capital_of_france(client):
    r = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
        temperature=0,
    )
    assert "Paris" in r.choices[0].message.content


def test_streaming_equals_non_streaming(client):
    msgs = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=msgs, max_tokens=32,
                                           temperature=0).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=msgs, max_tokens=32, temperature=0, stream=True))
    assert streamed == whole and whole
    comp = client.completions.create(model="base", prompt="The sun rises in the", max_tokens=12, temperature=0)
    comp_stream = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="The sun rises in the", max_tokens=12, temperature=0, stream=True))
    assert comp_stream == comp.choices[0].text and comp.usage.completion_tokens > 0


def test_health_answers_while_a_long_generation_runs(client, server):
    """Model work is off the event loop: /health answers while a 256-token generation is mid-stream."""
    events: list[tuple[str, float]] = []
    started = threading.Event()

    def long_generation():
        stream = client.completions.create(model="base", prompt="Once upon a time", max_tokens=256, temperature=0.8,
                                           seed=1, stream=True)
        for _ in stream:
            started.set()
        events.append(("done", time.monotonic()))

    t = threading.Thread(target=long_generation)
    t.start()
    assert started.wait(120)
    latencies = []
    for _ in range(5):
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        latencies.append(time.monotonic() - t0)
        events.append(("health", time.monotonic()))
    t.join(300)
    assert [e[0] for e in events][:5] == ["health"] * 5, "health only answered after the generation ended"
    print(f"/health latency during generation: max {max(latencies) * 1000:.1f} ms")


def test_quantized_defaults_take_fewer_bytes(source):
    sizes = {q: load_base(source, q, device=torch.device("cpu"), dtype=torch.bfloat16).resident_bytes
             for q in ("none", "int8", "nf4")}
    assert sizes["nf4"] < sizes["int8"] < sizes["none"]


def test_lora_trained_on_the_demo_task_beats_the_base_on_rouge_l(server, model_home, tmp_path):
    """The trainer on the real model: a short LoRA run on the demo summaries (a subset, so that CI
    stays fast), registered into the running server's registry and served by it."""
    import json
    import subprocess
    import sys

    from hotpeft.trainer.demo import SUMMARY_TEMPLATE, write_demo

    demo = write_demo(tmp_path / "demo")
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("".join(demo["support-summaries.train"].read_text().splitlines(keepends=True)[:48]))
    valid.write_text("".join(demo["support-summaries.valid"].read_text().splitlines(keepends=True)[:12]))
    done = subprocess.run(
        [sys.executable, "-m", "hotpeft.cli", "train", "--home", str(model_home), "--data", str(train),
         "--validation", str(valid), "--template", SUMMARY_TEMPLATE, "--method", "lora", "--name", "demo-sum",
         "--max-steps", "12", "--batch-size", "4", "--eval-max-new-tokens", "40", "--json", "--no-progress"],
        capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    base, adapter = result["metrics"]["base"], result["metrics"]["adapter"]
    assert adapter["rougeL"] > base["rougeL"] + 0.1, (base, adapter)
    assert adapter["loss"] < base["loss"]
    # the running server serves it by name, through the completions endpoint it was trained for
    prompt = SUMMARY_TEMPLATE.format(prompt=json.loads(valid.read_text().splitlines()[0])["prompt"])
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(server.url + "/v1/completions", timeout=300,
                       json={"model": "demo-sum", "prompt": prompt, "max_tokens": 40, "temperature": 0})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200 and r.headers["x-hotpeft-adapter"] == result["adapter"]
    assert "contacted support" in r.json()["choices"][0]["text"]


def test_the_demo_script_uses_the_home_it_is_given_and_no_network(source, model_home, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "demo_adapters.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HOTPEFT_"))}
    env |= {"HOME": str(tmp_path / "user"), "HOTPEFT_HOME": str(model_home)}
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "user" / ".hotpeft").exists()  # no second conversion under ~/.hotpeft
    assert "Unable to fetch remote file" not in r.stderr and "Name or service not known" not in r.stderr
    for name in ("pirate", "noisy"):
        files = {p.name for p in (tmp_path / "out" / name).iterdir()}
        assert files == {"adapter_config.json", "adapter_model.safetensors"}
    again = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "v2"), "--only", "noisy", "--seed", "1"],
                           capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and not (tmp_path / "v2" / "pirate").exists()
    first = (tmp_path / "out" / "noisy" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "v2" / "noisy" / "adapter_model.safetensors").read_bytes() != first  # other weights


def test_a_synthetic_base_has_the_real_shapes_random_weights_and_nothing_on_disk(source, model_home):
    from hotpeft.model.synthetic import SHAPES

    synthetic = resolve_model("synthetic:smollm2-135m", model_home)
    assert synthetic.model_id == "synthetic:smollm2-135m" and not list(synthetic.path.glob("*.safetensors"))
    base = load_base(synthetic, None, device=torch.device("cpu"), dtype=torch.float32)
    real = load_base(source, "none", device=torch.device("cpu"), dtype=torch.float32, weights=False)
    shape = SHAPES["smollm2-135m"]
    assert (base.arch.hidden_size, base.arch.num_layers, base.arch.num_kv_heads) == (
        shape["hidden_size"], shape["num_hidden_layers"], shape["num_key_value_heads"])
    assert base.arch == real.arch.__class__(**{**real.arch.__dict__, "max_position_embeddings": 8192,
                                                "rms_norm_eps": 1e-5})
    weights = base.model.model.layers[0].self_attn.q_proj.weight
    assert 0.015 < float(weights.std()) < 0.025  # drawn, not left empty
    assert base.quantization == "none" and base.tokenizer("hello")["input_ids"] == real.tokenizer("hello")["input_ids"]
    with pytest.raises(ValueError, match="runs unquantized"):
        load_base(synthetic, "nf4", device=torch.device("cpu"))


def test_gpu_check_script_runs_its_cpu_smoke(source, model_home, tmp_path):
    """scripts/gpu-check.sh, as the GPU machine runs it but on the CPU (GPU_CHECK_SMOKE=1): the CUDA
    tests skip, the bench runs on a synthetic base, and the results land in $OUT."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hotpeft.model.synthetic import write_synthetic

    home = tmp_path / "gpu-home"
    write_synthetic("synthetic:smollm2-135m", home, source.path)
    out = tmp_path / "out"
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900, env={
        **os.environ, "GPU_CHECK_SMOKE": "1", "GPU_HOME": str(home), "OUT": str(out), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped" in (out / "cuda-tests.log").read_text()
    bench = json.loads((out / "bench.json").read_text())
    assert bench["settings"]["model"] == "synthetic:smollm2-135m" and bench["scenarios"]["a"] is None
    assert bench["scenarios"]["b"]["output_tokens"] > 0
    eager = json.loads((out / "bench-eager.json").read_text())
    assert eager["settings"]["compile"] == "off" and eager["scenarios"]["b"]["output_tokens"] > 0
