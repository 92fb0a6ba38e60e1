"""The step runner: packs the running sequences into one batch, runs one forward pass, samples,
and turns each sampled token into its request's next event.

One decode token of every decoding row and a prompt chunk of every prefilling row go into one
batch of at most `max_batch_tokens` tokens, decode rows first so a long prompt never stalls
them. A step's integers (token ids, positions, KV rows, lengths, block tables) go to the device as
one tensor, and the sampled tokens come back in one copy: one host sync per step.
"""
from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass, field

import torch

from hotpeft.model.arch import Architecture
from hotpeft.server.engine.attention import StepShape
from hotpeft.server.engine.blocks import chain_hashes
from hotpeft.server.engine.detok import IncrementalText
from hotpeft.server.engine.forward import DecoderStep, StepInput
from hotpeft.server.engine.grammar import Grammars
from hotpeft.server.engine.graphs import DecodeGraphs
from hotpeft.server.engine.interface import EngineFailure, EventSink, GenerationRequest, OutOfMemory, TokenEvent
from hotpeft.server.engine.kv import PagedKVCache
from hotpeft.server.engine import logprobs
from hotpeft.server.engine.lora import LoraBank
from hotpeft.server.engine.processors import process
from hotpeft.server.engine.sampling import make_generator, sample

log = logging.getLogger("hotpeft.engine")
ECHO_CHUNK = 512  # most prompt positions an echo row scores in one step (each one's logits are kept)


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    sink: EventSink
    adapter_id: int  # LoRA bank id, 0 = no LoRA
    lora_key: str | None  # the resident LoRA this row uses (never evicted while it runs)
    embeds: torch.Tensor | None  # (P, H) prompt embeddings incl. soft prompt; dropped after prefill
    prompt_len: int  # P: positions to prefill (virtual tokens included; after a preemption, the output too)
    detok: IncrementalText
    generator: random.Random
    kv_key: str  # the weights that compute this row's KV: the prefix cache's namespace
    ids: list[int]  # every position's token: virtual tokens (negative), prompt, output
    blocks: list[int] = field(default_factory=list)  # KV blocks, in position order
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of the full blocks committed so far
    prefilled: int = 0
    kv_len: int = 0
    generated: int = 0
    last_token: int = -1
    done: bool = False
    penalties: object | None = None  # processors.PenaltyState of a row with penalties
    pending_logprob: list | None = None  # this step's [token, logprob, top] (rows with logprobs)
    prompt_lp: list = field(default_factory=list)  # echo: the prompt tokens scored so far
    prompt_scored: bool = False  # echo: every prompt token scored (set when its prefill ends)
    matcher: object | None = None  # llguidance LLMatcher of a row with a grammar
    virtual: int = 0  # soft-prompt positions before the prompt

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.prompt_len


class StepRunner:
    def __init__(self, model: torch.nn.Module, arch: Architecture, kv: PagedKVCache, bank: LoraBank, tokenizer,
                 eos_ids: set[int], max_batch_tokens: int, max_model_len: int, graphs: str | None = None,
                 max_rows: int = 32):
        self.step_fn = DecoderStep(model, arch, kv, bank, max_model_len)
        self.graphs = None
        if graphs == "cuda-graphs" and not self.step_fn.attention.reads_tables:
            log.warning("decode steps are not captured as CUDA graphs: the attention kernel here (%s) does not read "
                        "block tables, and a captured step would read every row to --max-model-len",
                        self.step_fn.attention.name)
        elif graphs:
            self.graphs = DecodeGraphs(self.step_fn, bank, kv.block_size, max_model_len, max_rows,
                                       model.get_input_embeddings().weight.device, graphs)
        self.kv, self.bank, self.tokenizer, self.eos_ids = kv, bank, tokenizer, eos_ids
        self.max_batch_tokens = max_batch_tokens
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.vocab_size = self.embed.weight.shape[0]
        self.grammars = Grammars(tokenizer, self.vocab_size, eos_ids)

    # ---- admission --------------------------------------------------------------------------------
    def prompt_embeds(self, request: GenerationRequest) -> torch.Tensor:
        """(P, H): the prompt's token embeddings, a soft prompt's virtual tokens before them."""
        ids = request.prompt_ids
        if not ids or min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        embeds = self.embed(torch.tensor(ids, dtype=torch.long, device=self.device))  # (T, H)
        adapter = request.adapter
        if adapter is not None and adapter.kind == "prompt_tuning":
            # Virtual-token embeddings before the input, positions 0..n-1 (as PEFT does).
            soft = adapter.adapter.soft_prompt.to(device=self.device, dtype=embeds.dtype)  # (n, H)
            embeds = torch.cat([soft, embeds])
        if embeds.shape[0] + request.params.max_tokens > self.kv.capacity_tokens:
            raise ValueError(f"prompt ({embeds.shape[0]} positions) + max_tokens ({request.params.max_tokens}) "
                             f"exceed the whole KV cache of {self.kv.capacity_tokens} tokens (--kv-cache-mib)")
        return embeds

    def sequence(self, request: GenerationRequest, sink: EventSink, adapter_id: int, lora_key: str | None,
                 embeds: torch.Tensor) -> Sequence:
        p = request.params
        adapter = request.adapter
        n_virtual = embeds.shape[0] - len(request.prompt_ids)
        return Sequence(request, sink, adapter_id, lora_key, embeds, embeds.shape[0],
                        IncrementalText(self.tokenizer, list(p.stop)), make_generator(p.seed),
                        kv_key="base" if adapter is None else adapter.key,
                        ids=list(range(-n_virtual, 0)) + list(request.prompt_ids), virtual=n_virtual)

    def resume_embeds(self, s: Sequence) -> torch.Tensor:
        """A preempted row's prefill: its prompt and what it generated, recomputed into fresh blocks."""
        output = s.ids[self._prompt_positions(s):]
        embeds = self.prompt_embeds(s.request)
        if output:
            embeds = torch.cat([embeds, self.embed(torch.tensor(output, dtype=torch.long, device=self.device))])
        return embeds

    @staticmethod
    def _prompt_positions(s: Sequence) -> int:
        return sum(1 for t in s.ids if t < 0) + len(s.request.prompt_ids)

    def commit_full_blocks(self, s: Sequence) -> None:
        """Name the blocks this row has filled, so later rows of the same weights can reuse them."""
        bs = self.kv.block_size
        full = s.kv_len // bs
        if full > len(s.hashes):
            start = len(s.hashes)
            new = chain_hashes(s.kv_key, s.ids[:full * bs], bs, start, s.hashes[-1] if s.hashes else None)
            for i, h in enumerate(new):
                self.kv.pool.commit(s.blocks[start + i], h)
            s.hashes += new

    # ---- one step ---------------------------------------------------------------------------------
    def takes(self, rows: list[Sequence]) -> list[int]:
        """Tokens each row runs this step: 1 when decoding, a prompt chunk within the token budget."""
        budget = self.max_batch_tokens - sum(1 for s in rows if s.decoding)
        out = []
        for s in rows:
            take = 1 if s.decoding else min(s.prompt_len - s.prefilled, max(1, budget))  # every row moves
            if not s.decoding and s.request.params.prompt_logprobs is not None and not s.prompt_scored:
                take = min(take, ECHO_CHUNK)  # each scored position holds a row of logits this step
            if not s.decoding:
                budget -= take
            out.append(take)
        return out

    def upload(self, ints: list[int]) -> torch.Tensor:
        """One host -> device copy of a step's integers (pinned and asynchronous on CUDA)."""
        host = torch.tensor(ints, dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def build(self, rows: list[Sequence], takes: list[int]
              ) -> tuple[StepInput, list[Sequence], logprobs.PromptScores | None]:
        """The packed batch, the rows sampled this step and the prompt positions scored for echo
        rows. Every row holds the blocks its tokens need.

        Host work is per row and per block, never per token: each token's position, KV row and
        adapter are expanded from its row's on the device."""
        bs = self.kv.block_size
        decode_tokens = [s.last_token for s in rows if s.decoding]
        sample_rows, prefill = [], {}
        n_tok = 0
        for row, (s, take) in enumerate(zip(rows, takes)):
            if s.decoding:
                sample_rows.append(row)
            else:
                prefill[row] = s.embeds[s.prefilled:s.prefilled + take]
                if s.prefilled + take == s.prompt_len:
                    sample_rows.append(row)
            n_tok += take
        kv_lens = [s.kv_len + t for s, t in zip(rows, takes)]
        width = self.kv.blocks_for(max(kv_lens))
        table = [b for s in rows for b in (s.blocks[:width] + [0] * (width - len(s.blocks)))]
        r = len(rows)
        score_index, score_targets, spans = logprobs.score_plan(rows, takes)
        ints = self.upload(decode_tokens + takes + kv_lens + [s.adapter_id for s in rows] + sample_rows + table
                           + score_index + score_targets)
        cut = list(itertools.accumulate([len(decode_tokens), r, r, r, len(sample_rows), len(table),
                                         len(score_index), len(score_targets)]))
        dec, takes_t, lens, aids, sample_t, table_t, score_t, target_t = (ints[a:b] for a, b in zip([0] + cut, cut))
        scores = None
        if spans:
            scores = logprobs.PromptScores(score_t, target_t, score_targets, spans,
                                           max(s.request.params.prompt_logprobs for s, _ in spans))
        table_t = table_t.view(r, width)
        ends = takes_t.cumsum(0)
        row_of = torch.repeat_interleave(torch.arange(r, device=self.device), takes_t, output_size=n_tok)  # (N,)
        positions = (lens - takes_t)[row_of] + torch.arange(n_tok, device=self.device) - (ends - takes_t)[row_of]
        kv_rows = table_t[row_of, positions // bs] * bs + positions % bs
        embeds = self.embed(dec) if decode_tokens else None
        if prefill:  # packed in row order: a decode row's token between the prompt chunks
            pieces, di = [], 0
            for row in range(r):
                if row in prefill:
                    pieces.append(prefill[row])
                else:
                    pieces.append(embeds[di:di + 1])
                    di += 1
            embeds = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        attn = self.step_fn.attention.prepare(StepShape(takes, kv_lens, takes_t, lens, table_t, bs))
        step = StepInput(embeds=embeds, positions=positions, kv_rows=kv_rows, last_index=ends - 1, attn=attn,
                         sample_rows=sample_t, score_index=None if scores is None else score_t)
        self.bank.plan([s.adapter_id for s in rows], takes, aids[row_of])
        return step, [rows[i] for i in sample_rows], scores

    @torch.inference_mode()
    def run(self, rows: list[Sequence], takes: list[int]) -> list[tuple[EventSink, TokenEvent]]:
        """One forward pass for every row; advances the rows and returns the events to send.
        Raises when the step failed (no row has moved then)."""
        try:
            b = self.graphs.bucket(rows) if self.graphs is not None else None
            scores = score_logits = None
            if b is not None:  # a decode-only step at a fixed shape
                ints = self.graphs.inputs([s.last_token for s in rows], [s.kv_len + 1 for s in rows],
                                          [s.adapter_id for s in rows], [s.blocks for s in rows], b)
                logits, sampled = self.graphs.run(ints, b)[:len(rows)], rows
            else:
                step, sampled, scores = self.build(rows, takes)
                logits = self.step_fn.forward(step)  # (S [+ K], V); S = 0 when every row is mid-prompt
                if scores is not None:
                    logits, score_logits = logits[:len(sampled)], logits[len(sampled):]
            tokens = []
            if sampled or scores is not None:
                tokens = self.sample(logits, sampled, score_logits, scores)
        finally:
            self.bank.clear_plan()
        for s, take in zip(rows, takes):
            s.kv_len += take
            if not s.decoding:
                s.prefilled += take
                if s.decoding:
                    s.embeds = None  # the prompt is in the KV cache now
                    s.prompt_scored = True
            self.commit_full_blocks(s)
        events = []
        for s, token in zip(sampled, tokens):
            try:
                events.append((s.sink, self.event(s, token)))
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer error: this row only
                log.exception("request %d failed after sampling", s.request.request_id)
                events.append((s.sink, TokenEvent("", [], error=EngineFailure(
                    f"generation failed: {type(e).__name__}: {e}"))))
                s.done = True
        return events

    def sample(self, raw: torch.Tensor, rows: list[Sequence], score_logits: torch.Tensor | None,
               scores: logprobs.PromptScores | None) -> list[int]:
        """The sampled tokens of `rows`, read with the logprobs of the rows that ask in the step's
        one device -> host copy."""
        tokens = raw.new_zeros(0, dtype=torch.long)
        if rows:
            logits = process(raw, rows, self.eos_ids)  # penalties, logit_bias, min_tokens: rows that ask
            logits = self.grammars.mask(logits, rows)  # structured outputs: rows with a grammar
            tokens = sample(logits, [s.request.params.temperature for s in rows], [s.request.params.top_p for s in rows],
                            [s.generator for s in rows])
        packed = logprobs.pack(raw, tokens, rows, score_logits, scores)
        if packed is None:
            return tokens.tolist()
        return logprobs.unpack(packed.tolist(), rows, scores)

    def event(self, s: Sequence, token: int) -> TokenEvent:
        p = s.request.params
        echo = None
        if p.prompt_logprobs is not None and s.generated == 0:  # the first event carries the prompt's
            echo = [[s.request.prompt_ids[0], None, []]] + s.prompt_lp
            s.prompt_lp = []
        if p.max_tokens == 0:  # echo only: the prompt scored, nothing generated
            s.done = True
            return TokenEvent("", [], "length", len(s.request.prompt_ids), 0, prompt_logprobs=echo)
        s.generated += 1
        s.last_token = token
        s.ids.append(token)
        finish, text = None, ""
        if s.matcher is not None and s.matcher.is_error():  # never an EOS that hides a broken grammar as "stop"
            raise RuntimeError(f"the grammar engine failed: {s.matcher.get_error()}")
        # every sampled token's logprob, EOS too (lm-evaluation-harness reads the sampled token's entry)
        scored = None if s.pending_logprob is None else [s.pending_logprob]
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            finish = "stop"
        else:
            complete = s.matcher is not None and self.grammars.advance(s, token)
            text = s.detok.push(token)
            if s.detok.stopped or complete:
                finish = "stop"
            elif s.generated >= p.max_tokens:
                finish = "length"
        if finish is not None and not s.detok.stopped:
            text += s.detok.finish()
        if finish is not None:
            s.done = True
        return TokenEvent(text, [token], finish, len(s.request.prompt_ids), s.generated, logprobs=scored,
                          prompt_logprobs=echo)


def step_error(e: BaseException) -> Exception:
    """Out of memory is a capacity problem (503, retry); anything else is a failed generation (500)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return OutOfMemory("the server ran out of memory for this batch; retry shortly (or lower --max-num-seqs "
                           "/ --max-batch-tokens)", retry_after=2)
    return EngineFailure(f"generation failed: {type(e).__name__}: {e}")
