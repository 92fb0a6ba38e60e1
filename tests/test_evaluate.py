"""Held-out evaluation computes what the plain definitions say, however examples are batched."""
import random

import torch

import tiny
from hotpeft.trainer.data import IGNORE, Encoded
from hotpeft.trainer.evaluate import generate, held_out_loss, score


def _examples(n: int, seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, 259) for _ in range(rng.randrange(2, 30))]
        answer = [rng.randrange(3, 259) for _ in range(rng.randrange(1, 12))]
        out.append(Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, prompt, ""))
    return out


def test_held_out_loss_is_the_mean_cross_entropy_of_the_completion_tokens():
    model = tiny.make_model()
    examples = _examples(13)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:  # one at a time, no padding: the definition
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            targets = torch.tensor(e.labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum"))
            count += int((targets != IGNORE).sum())
    for batch_size in (1, 4, 8):
        got = held_out_loss(model, examples, pad=0, device=torch.device("cpu"), batch_size=batch_size)
        assert abs(got - total / count) < 1e-4 * (total / count), batch_size


def test_batched_generation_equals_one_prompt_at_a_time_in_the_input_order():
    model, tok = tiny.make_model(), tiny.make_tokenizer()
    prompts = [e.prompt_ids for e in _examples(9, seed=1)]
    alone = [generate(model, tok, [p], max_new_tokens=6, eos_ids=[2], pad=0, device=torch.device("cpu"))[0]
             for p in prompts]
    assert generate(model, tok, prompts, max_new_tokens=6, eos_ids=[2], pad=0, device=torch.device("cpu"),
                    batch_size=4) == alone


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    import sacrebleu

    refs = ["the cat sat on the mat", "a quick brown fox jumps", "hello world", "tea is served at five"]
    preds = ["the cat sat on a mat", "a quick fox jumped", "hello world", "coffee at five"]
    got = score(preds, refs, ("bleu", "chrf", "exact_match"))
    assert got["bleu"] == sacrebleu.corpus_bleu(preds, [refs]).score
    assert got["chrf"] == sacrebleu.corpus_chrf(preds, [refs]).score
    assert 0 < got["bleu"] < 100 and got["exact_match"] == 0.25 and "rouge1" not in got
    assert set(got["signatures"]) == {"bleu", "chrf"}
