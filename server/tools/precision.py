"""Measure the base model's quality and speed per resident precision, to choose the CPU default.

    python -m hotpeft.server.tools.precision [--home DIR] [--tokens 64]

Quality: mean negative log-likelihood per token of fixed reference texts (teacher-forced,
lower is better) and greedy-token agreement with the float32 base. Speed: greedy decode
tokens/s at batch 1 through transformers `generate` (the same for every precision).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hotpeft.model.load import LoadedBase, load_base
from hotpeft.model.source import resolve_model

REFERENCE_TEXTS = [
    "The capital of France is Paris. It lies on the Seine and is known for the Eiffel Tower, the Louvre museum "
    "and its cafes.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose "
    "and release oxygen.",
    "To reset your password, open the settings page, choose Security, click 'Forgot password' and follow the "
    "link we send to your email address.",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
]
PROMPTS = ["What is the capital of France?", "Explain what a binary search does.", "Give me three tips for sleeping well."]
VARIANTS = [("none", torch.float32), ("none", torch.bfloat16), ("int8", torch.float32), ("nf4", torch.float32),
            ("nf4", torch.bfloat16)]


@torch.inference_mode()
def measure(base: LoadedBase, n_tokens: int) -> dict:
    tok, model = base.tokenizer, base.model
    nll, count = 0.0, 0
    for text in REFERENCE_TEXTS:
        ids = torch.tensor([tok(text)["input_ids"]])
        out = model(input_ids=ids, labels=ids)
        nll += float(out.loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    greedy, seconds, generated = [], 0.0, 0
    for prompt in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
        seconds += time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        generated += len(new)
        greedy.append(new)
    return {"nll": nll / count, "tok_s": generated / seconds, "greedy": greedy, "bytes": base.resident_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=Path("~/.hotpeft").expanduser())
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    source = resolve_model("default", args.home)
    results = {}
    for q, dtype in VARIANTS:
        base = load_base(source, q, device=torch.device("cpu"), dtype=dtype)
        results[(q, dtype)] = measure(base, args.tokens)
        del base
    ref = results[("none", torch.float32)]["greedy"]
    print("| quantize | compute dtype | resident MiB | NLL/token | greedy tokens = float32 | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|")
    for (q, dtype), r in results.items():
        same = sum(a == b for x, y in zip(ref, r["greedy"]) for a, b in zip(x, y))
        total = sum(len(x) for x in ref)
        print(f"| {q} | {str(dtype).removeprefix('torch.')} | {r['bytes'] / 2**20:.0f} | {r['nll']:.3f} | "
              f"{100 * same / total:.0f}% | {r['tok_s']:.1f} |")


if __name__ == "__main__":
    main()
