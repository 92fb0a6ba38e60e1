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
import threading

import torch

from hotpeft.server.engine.processors import upload

log = logging.getLogger("hotpeft.engine")


def _llguidance():
    import llguidance
    import llguidance.hf  # not llguidance.torch: importing it compiles (torch.compile, seconds); its two
    return llguidance     # mask-filling calls are written out below


class Grammars:
    """The engine's grammar side: one llguidance tokenizer, matchers for rows, their masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        self.vocab_size = vocab_size
        self._mask: torch.Tensor | None = None
        self._tok = None
        self._ready = threading.Event()
        # llguidance's view of the vocabulary takes seconds to build (0.6 s to read the default
        # model's 49k tokens, 1.9 s more to index them at the first mask, on a laptop CPU): built in
        # the background from start-up, so neither the start nor the engine thread waits for it.
        threading.Thread(target=self._build, args=(tokenizer, sorted(eos_ids)), name="hotpeft-grammar-warm-up",
                         daemon=True).start()
        self._executor = _llguidance().LLExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)))

    def _build(self, hf_tokenizer, eos: list[int]) -> None:
        try:
            llg = _llguidance()
            self._tok = llg.hf.from_tokenizer(hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos or None)
            m = llg.LLMatcher(self._tok, llg.LLMatcher.grammar_from_regex("[a-z]+"), log_level=0)
            self._fill([(m, 0)], torch.zeros(1, (self.vocab_size + 31) // 32, dtype=torch.int32))
        except Exception:  # noqa: BLE001 - a constrained request then fails with the reason
            log.exception("the grammar engine could not read this tokenizer")
        finally:
            self._ready.set()

    @property
    def tokenizer(self):
        self._ready.wait()
        if self._tok is None:
            raise RuntimeError("the grammar engine could not read this model's tokenizer (see the server log)")
        return self._tok

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
        words = (self.vocab_size + 31) // 32
        if self._mask is None or self._mask.shape[0] < len(rows):
            self._mask = torch.zeros(max(len(rows), 8), words, dtype=torch.int32)
            if logits.device.type == "cuda":
                self._mask = self._mask.pin_memory()
        host = self._mask[:len(todo)]
        self._fill([(m, j) for j, (m, _) in enumerate(todo)], host)
        bits = host.to(logits.device, non_blocking=True)
        at = upload([i for _, i in todo], torch.long, logits.device)
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :logits.shape[1]]  # (G, V)
        out = logits.float().clone() if logits.dtype != torch.float32 else logits.clone()
        out[at] = out[at].masked_fill(~allowed, float("-inf"))
        return out

    def _fill(self, matchers: list, host: torch.Tensor) -> None:
        """Row j of `host` (int32, contiguous, on the host) <- the mask of the matcher given with j
        (as llguidance.torch's fill_next_token_bitmask and _par do)."""
        row_bytes = host.shape[1] * 4
        if len(matchers) > 1:  # in llguidance's threads, the GIL released
            self._executor.unsafe_compute_mask_ptr(matchers, host.data_ptr(), row_bytes, host.shape[0])
        else:
            m, j = matchers[0]
            m.unsafe_compute_mask_ptr(host[j].data_ptr(), row_bytes)

    @staticmethod
    def advance(s, token: int) -> bool:
        """The row's matcher takes its sampled token; True when the grammar is complete (only EOS may follow)."""
        m = s.matcher
        if not m.consume_token(token):
            raise RuntimeError(f"the grammar refused a token it allowed: {m.get_error()}")
        return m.is_stopped()
