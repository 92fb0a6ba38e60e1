"""`hotpeft train` / `hotpeft eval` as subprocesses on the tiny model, registering into the registry
of a running server (same home): each method lowers the held-out loss and is served without a restart."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from conftest import wait_for

from hotpeft.adapters.store import AdapterStore

METHODS = {
    "lora": ["--rank", "8"],
    "qlora": ["--rank", "8"],
    "prompt_tuning": ["--num-virtual-tokens", "8", "--prompt-init-text", "word answer"],
}


def hotpeft(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotpeft.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def train(server, tiny_dirs, data, name: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return hotpeft("train", "--model", str(tiny_dirs["base"]), "--home", str(server.home), "--data", str(data),
                   "--name", name, "--epochs", "4", "--batch-size", "8", "--eval-max-new-tokens", "8",
                   "--threads", "1", *extra, env=env)


def served_by(server, model: str) -> str | None:
    """The adapter version the server used for a request naming `model`, or None while it does not know it."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": "apple"}], "max_tokens": 2})
    return r.headers["x-hotpeft-adapter"] if r.status_code == 200 else None


@pytest.fixture(scope="module")
def trained(trainer_server, tiny_dirs, word_data):
    """One adapter per method, trained by the CLI while the server runs: {method: (name, json output)}."""
    out = {}
    for method, extra in METHODS.items():
        name = f"cli-{method.replace('_', '-')}"
        data = word_data["chat"] if method == "prompt_tuning" else word_data["pairs"]
        done = train(trainer_server, tiny_dirs, data, name, "--method", method, "--json", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        out[method] = (name, json.loads(done.stdout))
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_lowers_held_out_loss_registers_and_is_served(trained, trainer_server, method):
    name, result = trained[method]
    metrics = result["metrics"]
    assert result["adapter"] == f"{name}@1"
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"]
    training = metrics["training"]
    assert training["method"] == method and training["steps"] > 0 and training["train_tokens"] > 0
    assert 0 < training["trainable_params"] < training["total_params"] and training["adapter_bytes"] > 0
    assert training["base_precision"] == ("nf4" if method == "qlora" else "none")
    # the running server picked it up (no restart: same process) and serves it by name
    pid = trainer_server.proc.pid
    assert wait_for(lambda: served_by(trainer_server, name), 10, what=f"{name} served") == f"{name}@1"
    assert trainer_server.proc.pid == pid and trainer_server.proc.poll() is None
    record = httpx.get(f"{trainer_server.url}/v1/adapters/{name}").json()["versions"][0]
    assert record["source"] == "training" and record["kind"] == ("prompt_tuning" if method == "prompt_tuning" else "lora")
    assert record["metrics"]["adapter"]["loss"] == pytest.approx(metrics["adapter"]["loss"])
    assert record["source_detail"]["config"]["method"] == method


def test_training_again_makes_a_new_version(trainer_server, tiny_dirs, word_data, trained):
    name = trained["lora"][0]
    done = train(trainer_server, tiny_dirs, word_data["pairs"], name, "--max-steps", "2", "--json", "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["adapter"] == f"{name}@2"
    assert wait_for(lambda: served_by(trainer_server, name) == f"{name}@2", 10, what="version 2 served")
    assert served_by(trainer_server, f"{name}@1") == f"{name}@1"


def test_progress_bar_and_table_on_a_terminal_run(trainer_server, tiny_dirs, word_data):
    done = train(trainer_server, tiny_dirs, word_data["pairs"], "cli-table", "--max-steps", "3",
                 "--validation", str(word_data["pairs_valid"]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "training: 100%" in done.stderr and "3/3" in done.stderr and "loss=" in done.stderr
    # one bar per evaluated model: 8 held-out examples for the loss, 8 generated from
    assert "evaluating base: 100%" in done.stderr and "evaluating cli-table: 100%" in done.stderr
    assert "16/16" in done.stderr
    for row in ("held-out loss", "ROUGE-1", "ROUGE-L", "exact match", "trainable params", "training tokens/s",
                "peak memory (MiB)", "adapter size (bytes)"):
        assert row in done.stdout
    assert "8 held-out" in done.stderr  # the --validation file, not a split of --data
    assert "registered cli-table@1" in done.stdout


def test_eval_compares_base_and_adapters_side_by_side(trainer_server, tiny_dirs, word_data, trained):
    lora, qlora = trained["lora"][0], trained["qlora"][0]
    done = hotpeft("eval", "--model", str(tiny_dirs["base"]), "--home", str(trainer_server.home), "--adapter",
                   f"{lora}@1", "--adapter", qlora, "--data", str(word_data["pairs_valid"]), "--max-new-tokens", "8",
                   "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    columns = json.loads(done.stdout)
    assert list(columns) == ["base", f"{lora}@1", f"{qlora}@1"]
    for col in columns.values():
        assert {"loss", "rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match"} <= set(col) and col["examples"] == 8
        assert col["signatures"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert columns[f"{lora}@1"]["loss"] < columns["base"]["loss"]
    table = hotpeft("eval", "--model", str(tiny_dirs["base"]), "--home", str(trainer_server.home), "--adapter", lora,
                    "--data", str(word_data["pairs_valid"]), "--max-new-tokens", "4", "--metrics", "bleu,chrf")
    # a bare name is the active version: version 2, trained above
    assert table.returncode == 0 and "held-out loss" in table.stdout and f"{lora}@2" in table.stdout
    assert "evaluating base: 100%" in table.stderr and f"evaluating {lora}@2: 100%" in table.stderr
    assert "BLEU signature: nrefs:1|" in table.stdout and "chrF signature: nrefs:1|" in table.stdout
    assert "ROUGE-1" not in table.stdout  # --metrics picks what is computed
    bad = hotpeft("eval", "--model", str(tiny_dirs["base"]), "--home", str(trainer_server.home), "--adapter", lora,
                  "--data", str(word_data["pairs_valid"]), "--metrics", "bleu,meteor")
    assert bad.returncode == 2 and "--metrics: unknown metric(s) 'meteor'" in bad.stderr


def test_min_improvement_refuses_to_register(trainer_server, tiny_dirs, word_data):
    done = train(trainer_server, tiny_dirs, word_data["pairs"], "not-good-enough", "--max-steps", "2",
                 "--min-improvement", "loss=100")
    assert done.returncode == 1
    assert "not registered" in done.stderr and "loss improved by" in done.stderr and "asks +100" in done.stderr
    assert httpx.get(f"{trainer_server.url}/v1/adapters/not-good-enough").status_code == 404


@pytest.mark.parametrize("extra, match", [
    (["--rank", "0"], "--rank must be between 1 and 256, got 0"),
    (["--rank", "128"], "--rank 128 is above the servers' --max-lora-rank 64"),
    (["--learning-rate", "abc"], "--learning-rate must be a number"),
    (["--method", "full"], "--method full (full fine-tuning) is trained and evaluated by --sweep"),
    (["--data", "PAIRS:0"], "the weight must be a number above 0, got '0'"),
    (["--max-forgetting", "2"], "--max-forgetting must be between 0 and 1, got 2.0"),
    (["--retention", "none", "--max-forgetting", "0.1"], "--max-forgetting needs a retention set"),
    (["--max-forgetting", "0.1"], "--max-forgetting cannot be checked: the base answers none of the 94 items"),
    (["--sweep", "lora,adapterfusion"], "--sweep: unknown method(s) 'adapterfusion'"),
    (["--sweep", "lora", "--rank", "4,x"], "--rank takes whole numbers separated by commas"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such directory"),
    (["--min-improvement", "bertscore=1"], "unknown metric 'bertscore'"),
    (["--metrics", "rougeL,bogus"], "--metrics: unknown metric(s) 'bogus'; choose from rouge1, rouge2, rougeL, bleu"),
    (["--metrics", "rougeL", "--min-improvement", "bleu=1"], "bleu is not computed; add it to --metrics"),
])
def test_bad_options_exit_2_naming_the_flag(trainer_server, tiny_dirs, word_data, extra, match):
    done = train(trainer_server, tiny_dirs, word_data["pairs"], "bad-options", *extra)
    assert done.returncode == 2 and match in done.stderr, done.stderr[-2000:]


def test_bad_data_exits_2_naming_the_line(trainer_server, tiny_dirs, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": " b"}\n{oops\n')
    done = train(trainer_server, tiny_dirs, data, "bad-data")
    assert done.returncode == 2 and "training file, line 3: not valid JSON" in done.stderr, done.stderr[-2000:]
    assert httpx.get(f"{trainer_server.url}/v1/adapters/bad-data").status_code == 404


@pytest.mark.parametrize("point", ["trainer.step", "trainer.before-register", "store.before-rename"])
def test_killed_mid_training_or_mid_save_registers_nothing(trainer_server, tiny_dirs, word_data, point):
    name = "killed-" + point.replace(".", "-")
    done = train(trainer_server, tiny_dirs, word_data["pairs"], name, "--max-steps", "2",
                 env={"HOTPEFT_FAILPOINT": point})
    assert done.returncode == -9
    assert httpx.get(f"{trainer_server.url}/v1/adapters/{name}").status_code == 404
    # what the dead process had staged is removed when the store is next opened; the server serves on
    store = AdapterStore(trainer_server.home / "store")
    assert list(store.staging_root.iterdir()) == []
    assert served_by(trainer_server, "base") == "base"
    # and the same name trains and registers cleanly afterwards, as version 1
    again = train(trainer_server, tiny_dirs, word_data["pairs"], name, "--max-steps", "2", "--json", "--no-progress")
    assert again.returncode == 0 and json.loads(again.stdout)["adapter"] == f"{name}@1"
    # the killed run's work folder went with the next run's start
    assert list((trainer_server.home / "tmp").glob("train-*")) == []
