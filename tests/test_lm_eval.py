"""lm-evaluation-harness against `hotpeft serve`: its `local-completions` model scores a small local
multiple-choice task through `/v1/completions` (echo + logprobs), and every per-choice log-likelihood and
the accuracy equal what transformers + PEFT compute in-process on the same tiny model and adapter.

lm-eval runs as a child process (its command line, `python -m lm_eval`'s entry point), offline: the task
and its data are files written by lm_eval_task.py, the tokenizer is the tiny model's folder. The `hf`
backend on the same task checks the task and the reference without the server.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import lm_eval_task
import tiny

from hotpeft.trainer.benchmark import LM_EVAL_MAIN

TOL = 1e-3  # absolute, on a choice's summed log-likelihood (float32 throughout)
MARGIN = 1e-2  # the reference's best choice beats the next by more than this, so TOL cannot flip a prediction
ADAPTER = "lora-attn"
# Questions for the greedy extras: the first whose greedy continuation is text is used.
GREEDY_QUESTIONS = ["Say something.", "Name a thing.", "What comes next?", "Tell me a word.", "Go on.", "Continue."]


@pytest.fixture(scope="module")
def models(tiny_dirs):
    """{None: the tiny model, ADAPTER: the tiny model with that LoRA}, float32, as transformers + PEFT load them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=torch.float32).eval()  # noqa: E731
    return {"tok": AutoTokenizer.from_pretrained(tiny_dirs["base"]), None: load(),
            ADAPTER: PeftModel.from_pretrained(load(), tiny_dirs["adapters"] / ADAPTER).eval()}


def greedy_extra(models, key, taken: set[str]) -> tuple[str, list[str], int]:
    """A question whose right choice is the model's own greedy continuation (2 or 3 tokens): lm-eval's is_greedy
    is then True, which it reads as token_logprob == max(top_logprobs) (so a server must give both exactly).
    The random model's greedy bytes are often part of a UTF-8 character; the longest prefix that decodes to
    text and encodes back to the same tokens is used."""
    tok = models["tok"]
    for question in GREEDY_QUESTIONS:
        if question in taken:
            continue
        context = lm_eval_task.context({"question": question})
        ctx = tok(context, add_special_tokens=False).input_ids
        ids = tiny.greedy_reference(models[key], ctx, 3)
        for n in (3, 2):
            text = tok.decode(ids[:n])
            if len(ids) >= n and min(ids[:n]) >= len(tiny.SPECIALS) and "\ufffd" not in text \
                    and tok(context + text, add_special_tokens=False).input_ids == ctx + ids[:n]:
                taken.add(question)
                return question, [text, " stone", " paper"], 0
    raise AssertionError(f"no greedy continuation of {GREEDY_QUESTIONS} is 2 or more tokens of text")


@pytest.fixture(scope="module")
def task(tmp_path_factory, models):
    taken: set[str] = set()
    extra = [greedy_extra(models, key, taken) for key in (None, ADAPTER)]
    return lm_eval_task.write_task(tmp_path_factory.mktemp("lm-eval-task"), extra)


def score(models, key, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of log_softmax of the continuation's tokens given the context, whether every one of them is the
    argmax), tokenized as lm-eval does: the whole text, split at the context's length."""
    tok, model = models["tok"], models[key]
    ctx = tok(context, add_special_tokens=False).input_ids
    ids = tok(context + continuation, add_special_tokens=False).input_ids
    assert ids[:len(ctx)] == ctx
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[len(ctx) - 1:-1], dim=-1)  # the rows that predict the continuation
    target = torch.tensor(ids[len(ctx):])
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def reference(models, key, docs: list[dict]) -> list[list[tuple[float, bool]]]:
    """Per document, per choice: `score`."""
    return [[score(models, key, lm_eval_task.context(doc), c) for c in lm_eval_task.continuations(doc)] for doc in docs]


def accuracies(docs: list[dict], lls: list[list[float]]) -> tuple[list[float], list[float]]:
    """lm-eval's acc and acc_norm per document (acc_norm divides by the choice's length in characters)."""
    acc, acc_norm = [], []
    for doc, ll in zip(docs, lls):
        ll = np.array(ll)
        acc.append(float(np.argmax(ll) == doc["answer"]))
        acc_norm.append(float(np.argmax(ll / np.array([len(c) for c in doc["choices"]])) == doc["answer"]))
    return acc, acc_norm


def assert_clear_margins(docs, ref):
    for doc, row in zip(docs, ref):
        ll = np.array([r[0] for r in row])
        for scores in (ll, ll / np.array([len(c) for c in doc["choices"]])):
            top2 = np.sort(scores)[-2:]
            assert top2[1] - top2[0] > MARGIN, f"doc {doc['id']}: a near tie ({top2}); change the task's data"


@pytest.fixture(scope="module")
def references(models, task):
    refs = {}
    for key in (None, ADAPTER):
        refs[key] = reference(models, key, task["docs"])
        assert_clear_margins(task["docs"], refs[key])
        assert any(greedy for row in refs[key] for _, greedy in row), "no choice is greedy: is_greedy goes unchecked"
    assert refs[None] != refs[ADAPTER]
    return refs


CLI = LM_EVAL_MAIN  # lm-eval's command line, indexing only --include_path (as `hotpeft eval --benchmark`)


def run_lm_eval(task: dict, out: Path, model: str, model_args: dict, *extra: str) -> tuple[dict, list[dict]]:
    """lm-eval's command line in a child process, offline; returns (results JSON, samples by doc_id)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false"}
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    cmd = [sys.executable, "-c", CLI, "--model", model, "--model_args", args, "--tasks", task["task"],
           "--include_path", str(task["yaml"].parent), "--log_samples", "--output_path", str(out / "results"), *extra]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lm_eval exited with {proc.returncode}:\n{log[-6000:]}"
    (results,) = (out / "results").rglob("results_*.json")
    (samples,) = (out / "results").rglob(f"samples_{task['task']}_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line]
    return json.loads(results.read_text(encoding="utf-8")), sorted(rows, key=lambda r: r["doc_id"])


def check_against_reference(task: dict, results: dict, samples: list[dict], ref: list[list[tuple[float, bool]]]):
    docs = task["docs"]
    assert [s["doc_id"] for s in samples] == list(range(len(docs)))
    got = []
    for doc, sample, row in zip(docs, samples, ref):
        args = [sample["arguments"][f"gen_args_{i}"] for i in range(len(doc["choices"]))]
        assert [a["arg_0"] for a in args] == [lm_eval_task.context(doc)] * len(doc["choices"])
        assert [a["arg_1"] for a in args] == lm_eval_task.continuations(doc)
        resps = [(float(ll), greedy == "True") for ll, greedy in sample["filtered_resps"]]
        for i, ((ll, greedy), (ref_ll, ref_greedy)) in enumerate(zip(resps, row, strict=True)):
            assert ll == pytest.approx(ref_ll, abs=TOL), f"doc {doc['id']} choice {i}: {ll} != {ref_ll}"
            assert greedy == ref_greedy, f"doc {doc['id']} choice {i}: is_greedy {greedy} != {ref_greedy}"
        got.append([ll for ll, _ in resps])
    acc, acc_norm = accuracies(docs, [[r[0] for r in row] for row in ref])
    assert [s["acc"] for s in samples] == acc and [s["acc_norm"] for s in samples] == acc_norm
    metrics = results["results"][task["task"]]
    assert metrics["acc,none"] == pytest.approx(np.mean(acc))
    assert metrics["acc_norm,none"] == pytest.approx(np.mean(acc_norm))
    assert accuracies(docs, got) == (acc, acc_norm)


# The two server runs send the two prompt shapes lm-eval has: token ids (tokenized_requests=True, its default;
# prompt = [[ids]], one request per choice at batch_size 1) and text (tokenized_requests=False; at batch_size 4,
# prompt = [text, text, text, text], one choice per prompt, answered by choices[].index).
@pytest.mark.parametrize("model, tokenized, batch", [("tiny-llama", True, 1), (ADAPTER, False, 4)],
                         ids=["base-token-ids", "lora-text-batched"])
def test_lm_eval_local_completions_matches_peft(tiny_server, tiny_dirs, task, references, tmp_path, model, tokenized,
                                                batch):
    model_args = {"model": model, "base_url": f"{tiny_server.url}/v1/completions", "tokenizer": tiny_dirs["base"],
                  "tokenizer_backend": "huggingface", "tokenized_requests": tokenized, "num_concurrent": 1,
                  "max_retries": 1, "timeout": 60}
    results, samples = run_lm_eval(task, tmp_path, "local-completions", model_args, "--batch_size", str(batch))
    adapter = None if model == "tiny-llama" else model
    check_against_reference(task, results, samples, references[adapter])


def test_lm_eval_hf_backend_matches_reference(tiny_dirs, task, references, tmp_path):
    """lm-eval's own transformers + PEFT path on the same task: proves the task and the reference, server or not."""
    model_args = {"pretrained": tiny_dirs["base"], "peft": tiny_dirs["adapters"] / ADAPTER, "dtype": "float32"}
    results, samples = run_lm_eval(task, tmp_path, "hf", model_args, "--device", "cpu", "--batch_size", "1")
    check_against_reference(task, results, samples, references[ADAPTER])


@pytest.mark.parametrize("model", ["tiny-llama", ADAPTER])
def test_lm_eval_parses_a_sampled_eos(tiny_server, tiny_dirs, models, model):
    """lm-eval asks for one sampled token (max_tokens=1) and sums token_logprobs[ctxlen:-1]: it takes the last
    entry to be that sampled token. A real model often samples its EOS right after an answer; the tiny one
    never does, so logit_bias forces it here (the one field added to lm-eval's own request). The server must
    list a sampled EOS too, or lm-eval silently loses the continuation's last token."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=f"{tiny_server.url}/v1/completions", model=model,
                             tokenizer=str(tiny_dirs["base"]), tokenizer_backend="huggingface", max_retries=1)
    doc = lm_eval_task.documents()[0]
    context, continuation = lm_eval_task.context(doc), lm_eval_task.continuations(doc)[0]
    ctx, cont = lm._encode_pair(context, continuation)
    expected = score(models, None if model == "tiny-llama" else model, context, continuation)
    eos = models["tok"].eos_token_id
    for bias, finish in (({}, "length"), ({str(eos): 100}, "stop")):
        payload = lm._create_payload(lm.create_message([ctx + cont]), generate=False, seed=1234)
        payload.update({"logit_bias": bias} if bias else {})
        r = httpx.post(lm.base_url, json=payload, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["finish_reason"] == finish  # "stop": the sampled token is the EOS
        assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == len(ctx + cont) + 1, "echo + 1 sampled token"
        ((ll, greedy),) = LocalCompletionsAPI.parse_logprobs([out], tokens=[ctx + cont], ctxlens=[len(ctx)])
        assert ll == pytest.approx(expected[0], abs=TOL) and greedy == expected[1], f"logit_bias {bias}"
