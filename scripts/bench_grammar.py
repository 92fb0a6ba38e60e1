"""Grammar engines for structured output, measured on the default model's tokenizer (49,152 ids):
compile time of a JSON schema and the time to fill one row's token mask, per generated token,
while a valid instance is decoded token by token (issue "The OpenAI API that real applications
use"). One thread.

    pip install xgrammar llguidance outlines-core   # into a scratch environment, not the project's
    python scripts/bench_grammar.py --home H        # H: a hotpeft home with the converted default model
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hotpeft.model.source import resolve_model

torch.set_num_threads(1)
_args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_args.add_argument("--home", default="~/.hotpeft")
_args.add_argument("engines", nargs="*", default=["xgrammar", "llguidance", "outlines"])
ARGS = _args.parse_args()
TOK = resolve_model("default", Path(ARGS.home).expanduser()).path
hf = AutoTokenizer.from_pretrained(TOK)
V = len(hf)
schema = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}, "required": ["city", "zip"]},
    "intent": {"enum": ["refund", "shipping", "billing", "other"]}},
    "required": ["name", "age", "email", "tags", "address", "intent"], "additionalProperties": False}
instance = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"],
            "address": {"city": "London", "zip": "W1"}, "intent": "shipping"}
text = json.dumps(instance)
ids = hf(text, add_special_tokens=False)["input_ids"]
print("vocab", V, "tokens in the instance", len(ids))

def report(name, compile_s, times):
    times = sorted(times)
    print(f"{name}: compile {compile_s*1e3:.1f} ms; mask per token p50 {statistics.median(times)*1e6:.0f} us, "
          f"p95 {times[int(len(times)*0.95)]*1e6:.0f} us, max {times[-1]*1e6:.0f} us", flush=True)

def run_xgrammar():
    import xgrammar as xgr
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V)
    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compiled = compiler.compile_json_schema(json.dumps(schema))
    c = time.perf_counter() - t0
    times = []
    for rep in range(3):
        m = xgr.GrammarMatcher(compiled)
        bm = xgr.allocate_token_bitmask(1, V)
        for t in ids:
            t0 = time.perf_counter(); m.fill_next_token_bitmask(bm); times.append(time.perf_counter() - t0)
            assert m.accept_token(t), "rejected"
    report("xgrammar", c, times)

def run_llguidance():
    import llguidance, llguidance.hf, llguidance.torch as lt
    tok = llguidance.hf.from_tokenizer(hf)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    m = llguidance.LLMatcher(tok, grammar)
    c = time.perf_counter() - t0
    times = []
    for rep in range(3):
        m = llguidance.LLMatcher(tok, grammar)
        bm = lt.allocate_token_bitmask(1, tok.vocab_size)
        for t in ids:
            t0 = time.perf_counter(); lt.fill_next_token_bitmask(m, bm, 0); times.append(time.perf_counter() - t0)
            assert m.consume_token(t), m.get_error()
    report("llguidance", c, times)

def run_outlines():
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema
    def bytes_to_unicode():  # GPT-2's byte <-> printable character table
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b); cs.append(256 + n); n += 1
        return dict(zip(bs, map(chr, cs)))
    t0 = time.perf_counter()
    dec = {u: b for b, u in bytes_to_unicode().items()}
    table = {}
    for tid in range(V):
        if tid in hf.all_special_ids:
            continue
        tokstr = hf.convert_ids_to_tokens(tid)
        table.setdefault(bytes(dec[ch] for ch in tokstr), []).append(tid)
    vocab = oc.Vocabulary(hf.eos_token_id, table)
    v = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = oc.Index(build_regex_from_schema(json.dumps(schema)), vocab)
    c = time.perf_counter() - t0
    times = []
    for rep in range(3):
        g = oc.Guide(index)
        for t in ids:
            t0 = time.perf_counter()
            mask = torch.zeros(V, dtype=torch.bool); mask[torch.tensor(g.get_tokens())] = True
            times.append(time.perf_counter() - t0)
            g.advance(t)
    report(f"outlines-core (vocabulary {v*1e3:.0f} ms)", c, times)

for name in ARGS.engines:
    try:
        {"xgrammar": run_xgrammar, "llguidance": run_llguidance, "outlines": run_outlines}[name]()
    except Exception as e:  # noqa: BLE001 - report and go on with the next engine
        print(name, "failed:", type(e).__name__, str(e)[:300], file=sys.stderr)
