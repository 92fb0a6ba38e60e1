"""Incremental detokenizing with stop strings, and per-row sampling."""
import pytest
import torch

from hotpeft.server.engine.detok import IncrementalText
from hotpeft.server.engine.sampling import make_generator, sample

import tiny


@pytest.fixture(scope="module")
def tok():
    return tiny.make_tokenizer()


def _feed(tok, text, stop):
    d = IncrementalText(tok, stop)
    pieces = []
    for i in tok(text)["input_ids"]:
        pieces.append(d.push(i))
        if d.stopped:
            break
    pieces.append(d.finish())
    return pieces, d


def test_stop_string_is_cut_and_never_streamed(tok):
    pieces, d = _feed(tok, "hello world. END more text", ["END"])
    assert d.stopped and "".join(pieces) == "hello world. "
    assert all("E" not in p for p in pieces)  # the stop's first letter was held back, not streamed


def test_text_that_only_looks_like_a_stop_is_released(tok):
    pieces, d = _feed(tok, "an ENvelope", ["END"])
    assert not d.stopped and "".join(pieces) == "an ENvelope"


def test_multibyte_characters_are_not_split(tok):
    pieces, _ = _feed(tok, "naïve → café", [])
    assert "".join(pieces) == "naïve → café" and all("\ufffd" not in p for p in pieces)


def test_greedy_rows_take_argmax_and_seeds_repeat():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    temperature = [0.0, 1.0, 1.0]
    top_p = [1.0, 1.0, 0.9]
    a = [sample(logits, temperature, top_p, [make_generator(s) for s in (1, 2, 3)]) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    assert int(a[0][0]) == int(logits[0].argmax())
    draws = {int(sample(logits[1:2], temperature[1:2], top_p[1:2], [make_generator(s)])[0]) for s in range(40)}
    assert len(draws) > 3  # temperature 1 really samples


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample(logits, [1.0], [0.7], [make_generator(s)])[0]) for s in range(200)}
    assert seen == {0, 1}


def test_bytes_that_never_form_a_character_are_flushed_at_the_end(tok):
    lone = tok.convert_tokens_to_ids("Ã")  # byte 0xC3: the first half of a two-byte character
    d = IncrementalText(tok, [])
    assert d.push(lone) == ""  # held back, waiting for the second byte
    assert d.finish() == tok.decode([lone]) == "\ufffd"
