"""Structured outputs: each constrained row's next token masked to what its grammar allows.

The grammar engine is llguidance (chosen by measurement, BENCHMARKS.md: 2.3 ms to compile a
schema and 14 us p50 per token mask on the default tokenizer, with no dependencies of its own).
The HTTP layer turns `response_format`, `structured_outputs` and tool choices into an
llguidance grammar (JSON text) and validates it; a row carries it in `SamplingParams.grammar`
and gets its own `LLMatcher` when the engine admits it.

Per step: the masks of the constrained rows are computed on the host into one int32 bitmask
(one bit per token; in parallel threads when several rows are constrained), uploaded in one
copy and applied on the device; rows without a grammar are not touched and a step without any
constrained row does nothing here. After sampling, each constrained row's matcher consumes its
token. On a GPU the masks are computed while the forward pass runs (the runner asks for them
after launching it).
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("hotpeft.engine")


def _llguidance():
    import llguidance
    import llguidance.hf
    import llguidance.torch
    return llguidance


class Grammars:
    """The engine's grammar side: one llguidance tokenizer, matchers for rows, their masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        # Built here, not on the first constrained request: that would stall every running row
        # (0.6 s for the default model's 49k-token vocabulary on a laptop CPU).
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.tokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)
        self._executor = llg.LLExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)))
        self._mask: torch.Tensor | None = None

    def matcher(self, request):
        """The request's matcher, compiled once (a request that waits for room keeps it)."""
        if request.compiled is None:
            m = _llguidance().LLMatcher(self.tokenizer, request.params.grammar, log_level=0)
            if m.is_error():
                raise ValueError(f"the grammar could not be compiled: {m.get_error()}")
            request.compiled = m
        return request.compiled

    def mask(self, logits: torch.Tensor, rows: list) -> torch.Tensor:
        """`logits` (S, V) of the sampled rows -> the same with every constrained row's disallowed
        tokens at -inf (the same tensor when no row is constrained)."""
        todo = [(s.matcher, i) for i, s in enumerate(rows) if getattr(s, "matcher", None) is not None]
        if not todo:
            return logits
        llg = _llguidance()
        words = (self.vocab_size + 31) // 32
        if self._mask is None or self._mask.shape[0] < len(rows):
            self._mask = torch.zeros(max(len(rows), 8), words, dtype=torch.int32)
            if logits.device.type == "cuda":
                self._mask = self._mask.pin_memory()
        host = self._mask[:len(todo)]
        packed = [(m, j) for j, (m, _) in enumerate(todo)]
        if len(packed) > 1:
            llg.torch.fill_next_token_bitmask_par(self._executor, packed, host)
        else:
            llg.torch.fill_next_token_bitmask(packed[0][0], host, 0)
        bits = host.to(logits.device, non_blocking=True)
        at = torch.tensor([i for _, i in todo], dtype=torch.long).to(logits.device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :logits.shape[1]]  # (G, V)
        out = logits.float().clone() if logits.dtype != torch.float32 else logits.clone()
        out[at] = out[at].masked_fill(~allowed, float("-inf"))
        return out

    @staticmethod
    def advance(s, token: int) -> bool:
        """The row's matcher takes its sampled token; True when the grammar is complete (only EOS may follow)."""
        m = s.matcher
        if not m.consume_token(token):
            raise RuntimeError(f"the grammar refused a token it allowed: {m.get_error()}")
        return m.is_stopped()
