"""The step runner: packs the running sequences into one batch, runs one forward pass, samples,
and turns each sampled token into its request's next event.

One decode token of every decoding row and a prompt chunk of every prefilling row go into one
batch of at most `max_batch_tokens` tokens, decode rows first so a long prompt never stalls
them. Each row's token ids, positions and slots go to the device as one tensor each per step.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from hotpeft.model.arch import Architecture
from hotpeft.server.engine.detok import IncrementalText
from hotpeft.server.engine.forward import DecoderStep, StepInput
from hotpeft.server.engine.interface import EngineFailure, EventSink, GenerationRequest, OutOfMemory, TokenEvent
from hotpeft.server.engine.kv import SlotKVCache
from hotpeft.server.engine.lora import LoraBank
from hotpeft.server.engine.sampling import make_generator, sample

log = logging.getLogger("hotpeft.engine")

@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    sink: EventSink
    slot: int
    adapter_id: int  # LoRA bank id, 0 = no LoRA
    lora_key: str | None  # the resident LoRA this row uses (never evicted while it runs)
    embeds: torch.Tensor | None  # (P, H) prompt embeddings incl. soft prompt; dropped after prefill
    prompt_len: int  # P: positions of the prompt, virtual tokens included
    detok: IncrementalText
    generator: torch.Generator
    prefilled: int = 0
    kv_len: int = 0
    generated: int = 0
    last_token: int = -1
    done: bool = False

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.prompt_len


class StepRunner:
    def __init__(self, model: torch.nn.Module, arch: Architecture, kv: SlotKVCache, bank: LoraBank, tokenizer,
                 eos_ids: set[int], max_batch_tokens: int):
        self.step_fn = DecoderStep(model, arch, kv, bank)
        self.kv, self.bank, self.tokenizer, self.eos_ids = kv, bank, tokenizer, eos_ids
        self.max_batch_tokens = max_batch_tokens
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.vocab_size = self.embed.weight.shape[0]

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
        if embeds.shape[0] + request.params.max_tokens > self.kv.slot_len:
            raise ValueError(f"prompt ({embeds.shape[0]} positions) + max_tokens ({request.params.max_tokens}) "
                             f"exceed the KV slot of {self.kv.slot_len} positions")
        return embeds

    def sequence(self, request: GenerationRequest, sink: EventSink, slot: int, adapter_id: int,
                 lora_key: str | None, embeds: torch.Tensor) -> Sequence:
        p = request.params
        return Sequence(request, sink, slot, adapter_id, lora_key, embeds, embeds.shape[0],
                        IncrementalText(self.tokenizer, list(p.stop)), make_generator(p.seed))

    # ---- one step ---------------------------------------------------------------------------------
    def build(self, rows: list[Sequence]) -> tuple[StepInput, list[Sequence], list[int]]:
        """The packed batch, the rows sampled this step, and how many tokens each row takes."""
        decode_tokens = [s.last_token for s in rows if s.decoding]
        all_decoding = len(decode_tokens) == len(rows)
        budget = self.max_batch_tokens - len(decode_tokens)
        takes, pieces, positions, slots, chunks, sample_rows = [], [], [], [], [], []
        decode_embeds = self.embed(torch.tensor(decode_tokens, dtype=torch.long, device=self.device)) \
            if decode_tokens else None
        di = 0
        n_tok = 0
        for row, s in enumerate(rows):
            if s.decoding:
                take = 1
                if not all_decoding:
                    pieces.append(decode_embeds[di:di + 1])
                di += 1
                sample_rows.append(row)
            else:
                take = min(s.prompt_len - s.prefilled, max(1, budget))  # every row moves every step
                budget -= take
                pieces.append(s.embeds[s.prefilled:s.prefilled + take])
                if take > 1:
                    chunks.append((row, n_tok, n_tok + take, s.kv_len))
                if s.prefilled + take == s.prompt_len:
                    sample_rows.append(row)
            positions.extend(range(s.kv_len, s.kv_len + take))
            slots.extend([row] * take)
            takes.append(take)
            n_tok += take
        dev = self.device
        kv_lens = [s.kv_len + t for s, t in zip(rows, takes)]
        if all_decoding:
            embeds = decode_embeds  # already in row order
        else:
            embeds = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        step = StepInput(
            embeds=embeds,
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            token_slots=torch.tensor(slots, dtype=torch.long, device=dev),
            last_index=torch.tensor(list(itertools.accumulate(takes)), dtype=torch.long, device=dev) - 1,
            kv_lens=torch.tensor(kv_lens, dtype=torch.long, device=dev),
            chunks=chunks,
            read_len=max(kv_lens),
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        self.bank.plan([s.adapter_id for s, t in zip(rows, takes) for _ in range(t)])
        return step, [rows[r] for r in sample_rows], takes

    @torch.inference_mode()
    def run(self, rows: list[Sequence]) -> list[tuple[EventSink, TokenEvent]]:
        """One forward pass for every row; advances the rows and returns the events to send.
        Raises when the step failed (no row has moved then)."""
        try:
            step, sampled, takes = self.build(rows)
            self.kv.prepare(len(rows), step.read_len)
            logits = self.step_fn.forward(step)  # (S, V); S = 0 when every row is mid-prompt
            tokens = []
            if sampled:
                temperature = torch.tensor([s.request.params.temperature for s in sampled], device=logits.device)
                top_p = torch.tensor([s.request.params.top_p for s in sampled], device=logits.device)
                tokens = sample(logits, temperature, top_p, [s.generator for s in sampled]).tolist()  # the host sync
        finally:
            self.bank.clear_plan()
        for s, take in zip(rows, takes):
            s.kv_len += take
            if not s.decoding:
                s.prefilled += take
                if s.decoding:
                    s.embeds = None  # the prompt is in the KV cache now
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

    def event(self, s: Sequence, token: int) -> TokenEvent:
        p = s.request.params
        s.generated += 1
        s.last_token = token
        finish, text = None, ""
        if token in self.eos_ids and not p.ignore_eos:
            finish = "stop"
        else:
            text = s.detok.push(token)
            if s.detok.stopped:
                finish = "stop"
            elif s.generated >= p.max_tokens:
                finish = "length"
        if finish is not None and not s.detok.stopped:
            text += s.detok.finish()
        if finish is not None:
            s.done = True
        return TokenEvent(text, [token], finish, len(s.request.prompt_ids), s.generated)


def step_error(e: BaseException) -> Exception:
    """Out of memory is a capacity problem (503, retry); anything else is a failed generation (500)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return OutOfMemory("the server ran out of memory for this batch; retry shortly (or lower --max-num-seqs "
                           "/ --max-batch-tokens)", retry_after=2)
    return EngineFailure(f"generation failed: {type(e).__name__}: {e}")
