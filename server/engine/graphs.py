"""Decode steps at fixed shapes: captured as CUDA graphs, or compiled, with `--compile`.

A decode-only step (every row adds one token) is what a serving engine runs most, and on a GPU
its time is mostly kernel launches. Here such a step runs at a fixed shape: rows padded up to a
bucket (1, 2, 4, 8, 16, 24, 32, ... up to --max-num-seqs), block tables padded to the longest
sequence the pool allows, the LoRA deltas of every resident slot computed as one masked span
(the mask built on the device from each row's adapter id). Everything a step needs is one
buffer of integers (tokens, lengths, adapter ids, block tables) copied in before the replay;
padded rows decode token 0 at position 0 in the null block and are never sampled.

- `cuda-graphs`: each bucket's step captured once with `torch.cuda.graph` and replayed. Only
  with an attention kernel that reads K/V through the block tables (its cost follows the rows'
  real lengths); the gathered SDPA kernel would read the padded width every step.
- `compile`: the fixed-shape step through `torch.compile`, one compilation per bucket (cached
  by torch across restarts).
- `static`: the same fixed-shape code run eagerly: what the CPU tests compare with the dynamic
  step, token for token, so the captured code is the tested code.

A new layout of the LoRA stacks (an adapter loaded or dropped) invalidates the captured graphs;
each bucket is captured again at its next use.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from hotpeft.server.engine.attention import StepShape
from hotpeft.server.engine.forward import DecoderStep, StepInput
from hotpeft.server.engine.lora import LoraBank

log = logging.getLogger("hotpeft.engine")

MODES = ("static", "compile", "cuda-graphs")


def buckets(max_rows: int) -> list[int]:
    out = [b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_rows]
    b = 48
    while b < max_rows:
        out.append(b)
        b += 16 if b < 64 else 64
    return out + [max_rows]


class DecodeGraphs:
    def __init__(self, step_fn: DecoderStep, bank: LoraBank, block_size: int, max_model_len: int, max_rows: int,
                 device: torch.device, mode: str):
        if mode not in MODES:
            raise ValueError(f"decode graphs mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.step_fn, self.bank, self.bs, self.device, self.mode = step_fn, bank, block_size, device, mode
        self.width = -(-max_model_len // block_size)  # blocks of the longest sequence
        self.buckets = buckets(max_rows)
        self.compiled = torch.compile(self._forward, dynamic=False) if mode == "compile" else None
        self._graphs: dict[int, tuple] = {}  # bucket -> (graph, input buffer, logits)
        self._compiled: set[int] = set()  # buckets torch.compile has compiled (mode "compile")
        self._layout = -1  # the bank generation the graphs were captured with
        self._pool = None
        self.captures = 0

    def bucket(self, rows: list) -> int | None:
        """The bucket of a step of these rows; None when it is not decode-only or a row outgrows the width."""
        if self.mode == "eager" or not all(s.decoding and s.kv_len < self.width * self.bs for s in rows):
            return None
        i = bisect.bisect_left(self.buckets, len(rows))
        return self.buckets[i] if i < len(self.buckets) else None

    def inputs(self, tokens: list[int], lens: list[int], aids: list[int], tables: list[list[int]], b: int) -> list[int]:
        """The bucket's integers: rows past the real ones decode token 0 at position 0 of the null block."""
        pad = b - len(tokens)
        rows = [t[:self.width] + [0] * (self.width - len(t)) for t in tables] + [[0] * self.width] * pad
        return tokens + [0] * pad + lens + [1] * pad + aids + [0] * pad + [x for r in rows for x in r]

    def _forward(self, ints: torch.Tensor) -> torch.Tensor:
        """The fixed-shape decode step of one bucket: (B,) tokens, lengths after the step, adapter ids
        and (B, width) block tables in `ints` -> logits (B, V)."""
        w, bs = self.width, self.bs
        b = ints.shape[0] // (3 + w)
        tokens, lens, aids = ints[:b], ints[b:2 * b], ints[2 * b:3 * b]
        table = ints[3 * b:].view(b, w)
        positions = lens - 1
        kv_rows = table.gather(1, (positions // bs).unsqueeze(1)).squeeze(1) * bs + positions % bs
        ones = torch.ones_like(lens)
        attn = self.step_fn.attention.prepare(StepShape([1] * b, [w * bs] * b, ones, lens, table, bs))
        self.bank.plan_static(aids)
        try:
            step = StepInput(embeds=self.step_fn.embed(tokens), positions=positions, kv_rows=kv_rows,
                             last_index=torch.arange(b, device=ints.device), attn=attn,
                             sample_rows=torch.arange(b, device=ints.device))
            return self.step_fn.forward(step)
        finally:
            self.bank.clear_plan()

    def run(self, ints: list[int], b: int) -> torch.Tensor:
        """Logits (b, V) of one decode step of bucket b."""
        host = torch.tensor(ints, dtype=torch.long)
        if self.mode == "compile" and b not in self._compiled:  # compiled at its first step: say how long it took
            t0 = time.perf_counter()
            logits = self.compiled(host.to(self.device))
            self._compiled.add(b)
            log.info("decode step for %d rows compiled in %.1f s (torch.compile; cached for restarts)", b,
                     time.perf_counter() - t0)
            return logits
        if self.mode != "cuda-graphs":
            return (self.compiled or self._forward)(host.to(self.device))
        if self._layout != self.bank.generation:
            self._graphs.clear()  # the stacks or their layout changed: every graph read the old ones
            self._layout = self.bank.generation
        if b not in self._graphs:
            try:
                self._graphs[b] = self._capture(b, host)
            except Exception as e:  # noqa: BLE001 - this step and the next ones run eagerly
                log.warning("CUDA graphs off: capturing the decode step for %d rows failed (%s: %s); decoding "
                            "eagerly", b, type(e).__name__, e)
                torch.cuda.synchronize(self.device)
                self._graphs.clear()
                self.mode = "eager"
                return self._forward(host.to(self.device))
        graph, buffer, logits = self._graphs[b]
        buffer.copy_(host.pin_memory(), non_blocking=True)
        graph.replay()
        return logits

    def capture_all(self) -> None:
        """Capture every bucket's step now (rows all padding); a failure turns the graphs off, said in the log."""
        t0 = time.perf_counter()
        try:
            self._layout = self.bank.generation
            for b in self.buckets:
                self._graphs[b] = self._capture(b, torch.tensor(self.inputs([], [], [], [], b), dtype=torch.long))
        except Exception as e:  # noqa: BLE001 - serving goes on, eagerly
            log.warning("CUDA graphs off: capturing the decode step failed (%s: %s); decoding eagerly",
                        type(e).__name__, e)
            self._graphs.clear()
            self.mode = "eager"
            return
        log.info("decode steps captured as CUDA graphs for %s rows in %.1f s", ", ".join(map(str, self.buckets)),
                 time.perf_counter() - t0)

    def _capture(self, b: int, example: torch.Tensor) -> tuple:
        t0 = time.perf_counter()
        buffer = example.to(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up outside the capture (cuBLAS workspaces, lazy inits)
            self._forward(buffer)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(buffer)
        self.captures += 1
        log.debug("decode graph for %d rows captured in %.0f ms", b, (time.perf_counter() - t0) * 1000)
        return graph, buffer, logits
