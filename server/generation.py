"""From a validated API request to engine requests and back: templates, limits, choices.

No tensors here: prompts become token-id lists, the engine does the rest.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from hotpeft.adapters.catalog import AdapterVersion
from hotpeft.adapters.names import BASE_ALIAS
from hotpeft.model.chat import render
from hotpeft.server.engine.interface import GenerationRequest, SamplingParams, TokenEvent
from hotpeft.server.errors import InvalidRequest
from hotpeft.server.runtime import Runtime
from hotpeft.server.structured import grammar_for
from hotpeft.server.toolcalls import ToolPlan, plan_tools
from hotpeft.server.api.schemas.openai import ChatCompletionRequest, CompletionRequest


@dataclass
class Prepared:
    adapter: AdapterVersion | None  # None: the bare base
    prompts: list[list[int]]  # token ids, one list per prompt
    n: int
    params: list[SamplingParams]  # one per prompt (max_tokens may differ with the prompt's length)
    texts: list[str] | None = None  # completions: each prompt's text (echo returns it)
    tools: ToolPlan | None = None  # chat with tools: how calls are constrained or parsed

    def requests(self) -> list[GenerationRequest]:
        """n requests per prompt, in choice order (prompt-major)."""
        out = []
        for ids, params in zip(self.prompts, self.params):
            for j in range(self.n):
                seed = None if params.seed is None else params.seed + j
                out.append(GenerationRequest(list(ids), replace(params, seed=seed), self.adapter))
        return out

    @property
    def served(self) -> str:
        """What answers: the base, `name@N`, or `mix:<hash>` (the X-Hotpeft-Adapter header)."""
        return BASE_ALIAS if self.adapter is None else self.adapter.key

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts) * self.n


def _check_common(rt: Runtime, req, n_prompts: int = 1) -> None:
    s = rt.settings
    if req.n > s.max_n:
        raise InvalidRequest(f"n={req.n} is above this server's limit of {s.max_n} (--max-n)", param="n")
    if req.n * n_prompts > s.max_n:
        raise InvalidRequest(f"{n_prompts} prompts x n={req.n} = {req.n * n_prompts} choices; this server's limit is "
                             f"{s.max_n} per request (--max-n)", param="prompt")
    if len(req.stop) > s.max_stop:
        raise InvalidRequest(f"{len(req.stop)} stop sequences given; the limit is {s.max_stop} (--max-stop)", param="stop")
    for stop in req.stop:
        if len(stop) > s.max_stop_length:
            raise InvalidRequest(f"a stop sequence of {len(stop)} characters; the limit is {s.max_stop_length} "
                                 "(--max-stop-length)", param="stop")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    elif req.max_tokens == 0 and not req.echo:
        raise InvalidRequest("max_tokens must be at least 1 (0 only with echo: true, to score the prompt)",
                             param="max_tokens", code="invalid_value")


def _params(rt: Runtime, req, prompt_len: int, virtual: int, grammar: str | None = None) -> SamplingParams:
    s = rt.settings
    context = rt.base.max_model_len
    limit = min(context, s.max_total_tokens or context)
    used = prompt_len + virtual
    max_tokens = req.token_limit
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if s.max_prompt_tokens is not None and used > s.max_prompt_tokens:
        raise InvalidRequest(
            f"your prompt is {used} tokens; this server accepts at most {s.max_prompt_tokens} (--max-prompt-tokens)",
            param=prompt_param, code="prompt_too_long")
    if limit < context and used + (max_tokens or 1) > limit:
        completion = f"{max_tokens} in the completion" if max_tokens else "at least 1 to complete"
        raise InvalidRequest(
            f"this request needs {used + (max_tokens or 1)} tokens ({used} in the prompt, {completion}); this server "
            f"allows at most {limit} per choice (--max-total-tokens)",
            param=param if max_tokens else prompt_param, code="too_many_tokens")
    if used >= limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, your prompt is {used} tokens"
            + (f" ({prompt_len} in the prompt, {virtual} virtual tokens of the adapter)" if virtual else "")
            + ", which leaves no room for a completion.",
            param=prompt_param, code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = limit - used
    elif used + max_tokens > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, you requested {used + max_tokens} tokens "
            f"({used} in the prompt, {max_tokens} in the completion). Please reduce the prompt or {param}.",
            param=param, code="context_length_exceeded",
        )
    pool = rt.engine.stats().max_seq_tokens  # the whole KV cache: a longer sequence could never run
    if pool and used + (max_tokens if req.token_limit is not None else 1) > pool:
        raise InvalidRequest(
            f"this request needs {used + max_tokens} tokens of KV cache ({used} in the prompt, {max_tokens} in the "
            f"completion); this server's whole KV cache holds {pool} tokens (raise --kv-cache-mib)",
            param=param if req.token_limit is not None else prompt_param, code="too_many_tokens")
    if pool and used + max_tokens > pool:
        max_tokens = pool - used  # no max_tokens given: as far as the KV cache goes
    return SamplingParams(max_tokens, req.temperature, req.top_p, req.seed, tuple(req.stop), req.ignore_eos,
                          **_processors(rt, req, max_tokens, param, grammar))


def _processors(rt: Runtime, req, max_tokens: int, max_param: str, grammar: str | None) -> dict:
    """The logits processors' parameters; token ids checked against the model's vocabulary."""
    vocab = rt.base.arch.vocab_size
    bias = tuple((int(t), float(b)) for t, b in (req.logit_bias or {}).items())
    for param, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", req.stop_token_ids or [])):
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise InvalidRequest(f"{param}: token id {bad[0]} is outside this model's vocabulary of {vocab} ids "
                                 f"(0 to {vocab - 1})", param=param, code="invalid_value")
    min_tokens = req.min_tokens or 0
    if min_tokens > max_tokens:
        raise InvalidRequest(f"min_tokens ({min_tokens}) is more than {max_param} ({max_tokens})",
                             param="min_tokens", code="invalid_value")
    if isinstance(req, ChatCompletionRequest):
        logprobs, prompt_logprobs = (req.top_logprobs or 0) if req.logprobs else None, None
    else:
        logprobs, prompt_logprobs = req.logprobs, req.logprobs if req.echo else None
    return {"grammar": grammar or grammar_for(req, rt.settings.max_schema_bytes),
            "presence_penalty": req.presence_penalty or 0.0, "frequency_penalty": req.frequency_penalty or 0.0,
            "repetition_penalty": req.repetition_penalty or 1.0, "logit_bias": bias, "min_tokens": min_tokens,
            "stop_token_ids": tuple(req.stop_token_ids or ()), "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs}


def _virtual_tokens(adapter: AdapterVersion | None) -> int:
    return 0 if adapter is None else adapter.adapter.num_virtual_tokens


async def resolve_adapter(rt: Runtime, req) -> AdapterVersion | None:
    """The adapter a request runs on, its weights in the CPU tier (read from disk if needed).

    `adapters` (a weighted mix, never registered) takes the place of an adapter `model`.
    """
    catalog = rt.catalog
    if req.adapters:
        if req.model not in (rt.base.model_id, BASE_ALIAS):
            raise InvalidRequest(
                f"'adapters' mixes adapters on the base model: set model to {BASE_ALIAS!r} or "
                f"{rt.base.model_id!r}, not {req.model!r}", param="adapters",
            )
        sources = [(a.name, a.weight) for a in req.adapters]
        return await asyncio.to_thread(catalog.mix, sources, req.merge_strategy, density=req.merge_density)
    record = catalog.resolve(req.model).record
    if record is None:
        return None
    return await asyncio.to_thread(catalog.load, record)


def prepare_chat(rt: Runtime, req: ChatCompletionRequest, adapter: AdapterVersion | None) -> Prepared:
    _check_common(rt, req)
    template = adapter.adapter.chat_template if adapter else None
    tok = rt.tokenizer
    if template is None and not getattr(tok, "chat_template", None):
        raise InvalidRequest(f"model {req.model!r} has no chat template; use /v1/completions", param="model")
    plan = plan_tools(req, rt.settings.max_schema_bytes)
    conversation = [_message(m, i) for i, m in enumerate(req.messages)]
    try:
        text = render(tok, conversation, plan.tools if plan else None, template)
    except Exception as e:  # noqa: BLE001 - a template may raise anything (it is user-supplied Jinja)
        raise InvalidRequest(f"the chat template could not render these messages: {e}", param="messages") from e
    ids = tok(text, add_special_tokens=False)["input_ids"]
    params = _params(rt, req, len(ids), _virtual_tokens(adapter), plan.grammar if plan else None)
    return Prepared(adapter, [ids], req.n, [params], tools=plan)


def _message(m, i: int) -> dict:
    """A request's message as `model.chat` renders it (OpenAI's fields, `developer` as `system`)."""
    out = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        for k, c in enumerate(m.tool_calls):
            try:
                ok = isinstance(json.loads(c.function.arguments), dict)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                raise InvalidRequest("a tool call's arguments must be a JSON object (as text)",
                                     param=f"messages.{i}.tool_calls.{k}.function.arguments", code="invalid_value")
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def prepare_completion(rt: Runtime, req: CompletionRequest, adapter: AdapterVersion | None) -> Prepared:
    _check_common(rt, req, len(req.prompts))
    tok = rt.tokenizer
    vocab = rt.base.arch.vocab_size
    grammar = grammar_for(req, rt.settings.max_schema_bytes)  # compiled once for every prompt
    prompts, params, texts = [], [], []
    for i, given in enumerate(req.prompts):
        param = "prompt" if len(req.prompts) == 1 else f"prompt.{i}"
        if isinstance(given, list):  # token ids, used as they are
            ids = list(given)
            if max(ids) >= vocab:
                raise InvalidRequest(f"prompt token id {max(ids)} is outside this model's vocabulary of {vocab} ids "
                                     f"(0 to {vocab - 1})", param=param, code="invalid_value")
            text = tok.decode(ids) if req.echo else ""
        else:
            text = given
            ids = tok(text)["input_ids"]
        if not ids:
            if tok.bos_token_id is None:
                raise InvalidRequest("prompt must not be empty", param=param)
            ids = [tok.bos_token_id]
        prompts.append(ids)
        texts.append(text)
        params.append(_params(rt, req, len(ids), _virtual_tokens(adapter), grammar))
    return Prepared(adapter, prompts, req.n, params, texts)


@dataclass
class OpenChoices:
    """Every choice of a request, already submitted to the engine (in choice order)."""

    requests: list[GenerationRequest]
    streams: list[AsyncIterator[TokenEvent]]

    def cancel(self, rt: Runtime) -> None:
        for r in self.requests:
            rt.engine.cancel(r.request_id)


def open_choices(rt: Runtime, prepared: Prepared) -> OpenChoices:
    """Submit all choices now, before any response is sent, so a full queue is a clean 429.

    All or nothing: when one choice is refused, the ones already submitted are cancelled.
    """
    requests = prepared.requests()
    streams = []
    try:
        for r in requests:
            streams.append(rt.engine.generate(r))
    except Exception:
        for r in requests[:len(streams)]:
            rt.engine.cancel(r.request_id)
        raise
    return OpenChoices(requests, streams)


async def run_choices(rt: Runtime, choices: OpenChoices) -> AsyncIterator[tuple[int, TokenEvent]]:
    """All choices at once, merged as their events arrive: (choice index, event).

    Leaving the iteration early cancels every choice still running in the engine.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, e))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(choices.streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A stream whose task never started has no `finally` of its own to cancel it; the
        # engine ignores cancels of requests that already finished.
        choices.cancel(rt)
