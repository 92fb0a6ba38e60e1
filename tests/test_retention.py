"""Retention (catastrophic forgetting) and multi-task training.

A tiny Llama is first taught a handful of facts (full fine-tuning, here in the test), so that it has
something to forget. A LoRA trained hard on one narrow task then loses them and `--max-forgetting`
refuses to register it (CLI exit 1; a fine-tuning job fails with code `forgetting`); the same narrow
task mixed with the facts (multi-task training, the usual remedy) keeps them and is registered, with
every task and the retention set reported apart.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import ServerProcess
from test_jobs_api import finish
from test_train import hotpeft

import tiny
from hotpeft.trainer import retention as ret
from hotpeft.trainer.errors import ConfigInvalid, DatasetInvalid
from hotpeft.trainer.mixture import interleave, parse_data_args

FACTS = [("cat", "meow"), ("dog", "woof"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"), ("owl", "hoot"),
         ("lion", "roar"), ("bee", "buzz"), ("snake", "hiss"), ("frog", "croak"), ("horse", "neigh"), ("mouse", "squeak")]
WORDS = ["apple", "river", "green", "house", "music", "table", "cloud", "paper", "tiger", "light", "stone", "bread"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _knowing_model(path: Path) -> Path:
    """The tiny Llama, fully fine-tuned until it answers every fact (greedy)."""
    tok = tiny.make_tokenizer()
    model = tiny.make_model().train()
    rows = [(tok(f"sound: {a}\nanswer:")["input_ids"], tok(f" {s}")["input_ids"] + [tok.eos_token_id]) for a, s in FACTS]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
        mask[i, :len(p) + len(c)] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p, c in rows:
        out = model.generate(torch.tensor([p]), max_new_tokens=len(c), do_sample=False, pad_token_id=0)
        assert out[0, len(p):].tolist() == c, "the test base did not learn its facts"
    model.config._name_or_path = tiny.TINY_ID
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention")
    rng = random.Random(0)
    facts = _jsonl(root / "facts.jsonl", [{"prompt": f"sound: {a}\nanswer:", "completion": f" {s}"} for a, s in FACTS])
    narrow = _jsonl(root / "narrow.jsonl", [{"prompt": f"word: {w}\nanswer:", "completion": f" {w.upper()}"}
                                            for w in (rng.choice(WORDS) for _ in range(64))])
    # the facts are replayed whole: their held-out file is the training file (a replay task, not a test of it)
    mixture = root / "mixture.yaml"
    mixture.write_text("tasks:\n  - data: narrow.jsonl\n    weight: 1\n"
                       "  - name: replay\n    data: facts.jsonl\n    validation: facts.jsonl\n    weight: 2\n")
    return {"base": _knowing_model(root / "knowing"), "facts": facts, "narrow": narrow, "mixture": mixture,
            "home": root / "home"}


def train(setup, data: list[str], name: str, *extra: str):
    args = ["train", "--model", str(setup["base"]), "--home", str(setup["home"]), "--name", name, "--epochs", "6",
            "--learning-rate", "1e-2", "--eval-max-new-tokens", "8", "--threads", "1", "--retention",
            str(setup["facts"]), "--max-forgetting", "0.1", "--no-progress", *extra]
    for d in data:
        args += ["--data", d]
    return hotpeft(*args)


def test_a_narrow_adapter_forgets_and_is_refused(setup):
    done = train(setup, [str(setup["narrow"])], "narrow")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "the adapter forgot too much, so it was not registered" in done.stderr
    assert "the base scores 1.000" in done.stderr and "> --max-forgetting 0.1" in done.stderr
    # the figures the gate refused on are printed: the table and the retention line
    assert "retention (facts.jsonl set, 12 items): base 1.000" in done.stderr and "held-out loss" in done.stderr
    assert not (setup["home"] / "registry.db").exists() or "narrow" not in _registered(setup)


def test_a_multi_task_adapter_keeps_what_the_base_knew(setup):
    done = train(setup, [str(setup["mixture"])], "mixed", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    metrics = out["metrics"]
    assert out["adapter"] == "mixed@1" and "mixed" in _registered(setup)
    kept = metrics["retention"]
    assert kept["set"] == "facts.jsonl" and kept["items"] == 12 and kept["base"] == 1.0
    assert kept["drop"] <= 0.1 and kept["adapter"] == 1.0 - kept["drop"]
    tasks = metrics["tasks"]
    assert set(tasks) == {"narrow", "replay"} and tasks["replay"]["weight"] == 2.0
    assert tasks["narrow"]["adapter"]["exact_match"] > tasks["narrow"]["base"]["exact_match"]
    # "adapter" is the mean over the tasks
    mean = (tasks["narrow"]["adapter"]["loss"] + tasks["replay"]["adapter"]["loss"]) / 2
    assert metrics["adapter"]["loss"] == pytest.approx(mean) and metrics["adapter"]["mean_of_tasks"] == 2
    assert metrics["data"]["tasks"]["replay"]["train_examples"] == len(FACTS)


def test_eval_scores_retention_beside_the_task(setup):
    """`hotpeft eval` on the adapter the multi-task test registered: the base and it on the facts."""
    done = hotpeft("eval", "--model", str(setup["base"]), "--home", str(setup["home"]), "--adapter", "mixed",
                   "--data", str(setup["narrow"]), "--retention", str(setup["facts"]), "--max-new-tokens", "8",
                   "--threads", "1", "--no-progress", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    columns = json.loads(done.stdout)
    assert columns["base"]["retention"] == 1.0 and columns["base"]["retention_set"]["items"] == 12
    assert columns["mixed@1"]["retention_drop"] <= 0.1
    assert columns["mixed@1"]["retention"] == columns["mixed@1"]["retention_set"]["adapter"]


def test_a_fine_tuning_job_fails_with_code_forgetting(setup, tmp_path):
    server = ServerProcess(["--model", str(setup["base"]), "--dtype", "float32"], tmp_path / "home")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        train_file = client.files.create(file=open(setup["narrow"], "rb"), purpose="fine-tune")
        facts = client.files.create(file=open(setup["facts"], "rb"), purpose="fine-tune")
        two_turns = tmp_path / "two-turns.jsonl"
        _jsonl(two_turns, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}])
        not_a_set = client.files.create(file=open(two_turns, "rb"), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="retention file line 1: an item is one user message") as err:
            client.fine_tuning.jobs.create(model="base", training_file=train_file.id,
                                           extra_body={"hotpeft": {"retention": not_a_set.id}})
        assert err.value.body["param"] == "hotpeft.retention"
        job = client.fine_tuning.jobs.create(
            model="base", training_file=train_file.id, suffix="narrow-job",
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 6}}},
            extra_body={"hotpeft": {"learning_rate": 1e-2, "eval_max_new_tokens": 8, "retention": facts.id,
                                    "max_forgetting": 0.1}})
        job = finish(client, job.id)
        assert job.status == "failed" and job.error.code == "forgetting", job.error
        assert "the base scores 1.000" in job.error.message and job.error.param == "max_forgetting"
        assert httpx.get(f"{server.url}/v1/adapters/narrow-job").status_code == 404
        # multi-task through the API: the facts beside the narrow task, as `hotpeft.tasks`
        with pytest.raises(openai.BadRequestError, match="must be a number above 0") as err:
            client.fine_tuning.jobs.create(model="base", training_file=train_file.id, extra_body={
                "hotpeft": {"tasks": [{"training_file": facts.id, "weight": 0}]}})
        assert err.value.body["param"] == "hotpeft.tasks[0].weight"
        job = client.fine_tuning.jobs.create(
            model="base", training_file=train_file.id, suffix="mixed-job",
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 6}}},
            extra_body={"hotpeft": {"learning_rate": 1e-2, "eval_max_new_tokens": 8, "retention": facts.id,
                                    "max_forgetting": 0.1, "tasks": [{"training_file": facts.id, "weight": 2,
                                                                      "validation_file": facts.id, "name": "replay"}]}})
        job = finish(client, job.id)
        assert job.status == "succeeded", job.error
        metrics = job.model_extra["hotpeft"]["metrics"]
        assert set(metrics["tasks"]) == {"narrow", "replay"} and metrics["retention"]["drop"] <= 0.1
        version = httpx.get(f"{server.url}/v1/adapters/mixed-job").json()["versions"][0]
        assert version["metrics"]["retention"] == metrics["retention"]
        assert "/" not in version["source_detail"]["config"]["retention"]  # a file's name, not a path of the server
        assert version["source_detail"]["tasks"]["replay"]["weight"] == 2.0
    finally:
        server.stop()


def _registered(setup) -> set[str]:
    from hotpeft.adapters import AdapterRegistry

    registry = AdapterRegistry(f"sqlite:///{setup['home'] / 'registry.db'}")
    try:
        return set(registry.snapshot().versions)
    finally:
        registry.close()


# ---- the pieces ----------------------------------------------------------------------------------
def test_the_default_set_is_fixed_and_covers_three_abilities():
    items = ret.candidate_items()
    assert items == ret.candidate_items() and len(items) >= 80
    assert {i.kind for i in items} == {"fact", "arithmetic", "format"}
    assert len({i.prompt for i in items}) == len(items)


@pytest.mark.parametrize("check, answer, reply, ok", [
    ("words", "Paris", "The capital of France is Paris.", True),
    ("words", "New Delhi", "It is new delhi!", True),
    ("words", "Paris", "Parisian food is good.", False),
    ("words", "seven|7", "There are 7 days.", True),
    ("number", "15", "4 + 11 = 15", True),
    ("number", "5", "17 - 12 = 11", False),
    ("case", "APPLE", "APPLE", True),
    ("case", "APPLE", "apple", False),
    ("exact", "tiger", "\"Tiger.\"", True),
    ("exact", "tiger", "The word tiger.", False),
    ("first", "no", "No, a cat cannot fly.", True),
    ("first", "yes", "No, it is not. Yes.", False),
    ("words", "Paris", "\nParis\nLondon", True),
    ("words", "London", "Paris\nLondon", False),  # the first line only
])
def test_answers_are_checked_by_their_kind(check, answer, reply, ok):
    assert ret.correct(reply, ret.Item("q", answer, "x", check)) is ok


def test_a_bad_retention_file_names_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\n')
    with pytest.raises(DatasetInvalid, match="retention file, line 2"):
        ret.user_items(path)


def test_mixture_flags_and_files(tmp_path):
    tasks = parse_data_args(["a/sum.train.jsonl:2", "b/intents.jsonl", "c/x.jsonl:0.5"])
    assert [(t.name, t.weight, t.data) for t in tasks] == [("sum", 2.0, Path("a/sum.train.jsonl")),
                                                           ("intents", 1.0, Path("b/intents.jsonl")),
                                                           ("x", 0.5, Path("c/x.jsonl"))]
    for bad in ("a.jsonl:0", "a.jsonl:-1", "a.jsonl:two", "a.jsonl:nan"):
        with pytest.raises(ConfigInvalid, match=rf"--data {bad}: the weight must be a number above 0"):
            parse_data_args([bad])
    mix = tmp_path / "m.yaml"
    mix.write_text("tasks:\n  - {data: s.jsonl, weight: 3, template: 'Q: {prompt}'}\n  - {data: t.jsonl}\n")
    first, second = parse_data_args([str(mix)])
    assert (first.data, first.weight, first.template) == (tmp_path / "s.jsonl", 3.0, "Q: {prompt}")
    assert (second.name, second.weight, second.template) == ("t", 1.0, None)
    for text, match in [("tasks: [", "not valid YAML"), ("tasks: []", "non-empty list 'tasks'"),
                        ("tasks:\n  - {data: s.jsonl, weight: 0}", r"tasks\[1\]: the weight must be"),
                        ("tasks:\n  - {data: s.jsonl, lr: 1}", r"tasks\[1\]: unknown field\(s\) lr")]:
        mix.write_text(text)
        with pytest.raises(ConfigInvalid, match=match):
            parse_data_args([str(mix)])


def test_examples_are_mixed_by_weight_with_a_fixed_seed():
    a, b = [("a", i) for i in range(30)], [("b", i) for i in range(10)]
    epoch = interleave([a, b], [1.0, 3.0], seed=0)
    assert epoch == interleave([a, b], [1.0, 3.0], seed=0) != interleave([a, b], [1.0, 3.0], seed=1)
    assert len(epoch) == 40 and sum(e[0] == "a" for e in epoch) == 10 and sum(e[0] == "b" for e in epoch) == 30
    assert {e for e in epoch if e[0] == "b"} == set(b)  # the smaller task is repeated, every example used
    assert {e[0] for e in epoch[:10]} == {"a", "b"}  # mixed, not one task after the other


def test_a_json_file_is_a_mixture_only_when_it_holds_tasks(tmp_path):
    data = tmp_path / "pairs.json"  # JSONL named .json: training data, as before
    data.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion": " d"}\n')
    assert [(t.name, t.data) for t in parse_data_args([str(data)])] == [("pairs", data)]
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"tasks": [{"data": "pairs.json", "weight": 2}, {"data": "pairs.json"}]}))
    assert [(t.name, t.weight) for t in parse_data_args([str(mix)])] == [("pairs", 2.0), ("pairs-2", 1.0)]
    with pytest.raises(ConfigInvalid, match="a mixture file is given alone"):
        parse_data_args([str(mix), str(data)])


def test_the_default_set_keeps_only_what_the_base_answers():
    items = [ret.Item(f"q{i}", "a", "fact") for i in range(4)]
    s = ret.summarize(items, [True, True, False, True], [True, False, True, True], name="default", filtered=True)
    assert (s["candidates"], s["items"], s["base"]) == (4, 3, 1.0)
    assert s["adapter"] == pytest.approx(2 / 3) and s["drop"] == pytest.approx(1 / 3)  # item 2 does not count
    none = ret.summarize(items, [False] * 4, [True] * 4, name="default", filtered=True)
    assert none["items"] == 0 and none["drop"] is None
    mine = ret.summarize(items, [True, False, False, False], [True, True, False, False], name="f", filtered=False)
    assert (mine["items"], mine["base"], mine["adapter"], mine["drop"]) == (4, 0.25, 0.5, -0.25)
