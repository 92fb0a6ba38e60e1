"""OpenAI-compatible routes: models, chat completions, completions (streaming and not)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from hotpeft.server.api.logprobs import Legacy, chat_content
from hotpeft.model.chat import parse_tool_calls
from hotpeft.server.deps import RuntimeDep
from hotpeft.server.errors import describe
from hotpeft.server.generation import (
    OpenChoices, Prepared, open_choices, prepare_chat, prepare_completion, resolve_adapter, run_choices,
)
from hotpeft.server.metrics import RequestTracker
from hotpeft.server.runtime import Runtime
from hotpeft.server.toolcalls import ToolPlan, ToolStream, openai_calls
from hotpeft.server.api.schemas.openai import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["openai"])


def _base_card(rt: Runtime) -> ModelCard:
    b = rt.base
    return ModelCard(
        id=b.model_id, created=rt.started, owned_by="hotpeft", root=b.model_id, kind="base",
        precision=b.precision,
        resident_bytes=b.resident_bytes, device=str(b.device), max_model_len=b.max_model_len,
    )


def _adapter_cards(rt: Runtime) -> list[ModelCard]:
    return [
        ModelCard(id=r.name, created=int(r.created), owned_by="hotpeft", parent=rt.base.model_id,
                  root=rt.base.model_id, kind=r.kind, version=r.version)
        for r in rt.catalog.active()
    ]


@router.get("/models", response_model=ModelList, response_model_exclude_none=True)
async def list_models(rt: RuntimeDep) -> ModelList:
    return ModelList(data=[_base_card(rt), *_adapter_cards(rt)])


@router.get("/models/{model_id:path}", response_model=ModelCard, response_model_exclude_none=True)
async def get_model(model_id: str, rt: RuntimeDep) -> ModelCard:
    record = rt.catalog.resolve(model_id).record
    if record is None:
        return _base_card(rt)
    return ModelCard(id=model_id, created=int(record.created), owned_by="hotpeft", parent=rt.base.model_id,
                     root=rt.base.model_id, kind=record.kind, version=record.version)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _open(rt: Runtime, endpoint: str, body, prepare) -> tuple[RequestTracker, Prepared, OpenChoices]:
    """Resolve, prepare and submit; every refusal is counted with its outcome."""
    tracker = rt.metrics.track(endpoint)
    try:
        adapter = await resolve_adapter(rt, body)
        tracker.resolved(adapter)
        prepared = await asyncio.to_thread(prepare, rt, body, adapter)  # templates, tokens, grammars: off the loop
        return tracker, prepared, open_choices(rt, prepared)
    except Exception as e:
        tracker.failed(e)
        raise


@dataclass
class Collected:
    """Every choice's whole answer."""

    texts: list[str]
    finish: list[str | None]
    logprobs: list[list]  # per choice: the engine's [token, logprob, top] entries of its output
    prompt_logprobs: list[list | None]  # per choice, with echo: its prompt tokens' entries
    completion_tokens: int = 0
    replicas: set[str] = field(default_factory=set)


async def _collect(request: Request, rt: Runtime, choices: OpenChoices, n_choices: int, tracker: RequestTracker,
                   prompt_tokens: int) -> Collected | None:
    """Whole texts per choice; a client that goes away cancels the generation."""
    out = Collected([""] * n_choices, [None] * n_choices, [[] for _ in range(n_choices)], [None] * n_choices)

    async def gather():
        async for i, ev in run_choices(rt, choices):
            if ev.replica:
                out.replicas.add(ev.replica)
                tracker.replica = ev.replica
            out.texts[i] += ev.text
            out.completion_tokens += len(ev.token_ids)
            tracker.tokens(i, len(ev.token_ids))
            if ev.logprobs:
                out.logprobs[i] += ev.logprobs
            if ev.prompt_logprobs is not None:
                out.prompt_logprobs[i] = ev.prompt_logprobs
            if ev.finish_reason:
                out.finish[i] = ev.finish_reason

    work = asyncio.create_task(gather())
    watcher = asyncio.create_task(_until_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            choices.cancel(rt)  # also when the task was cancelled before it began
    if work.cancelled():
        tracker.finish("cancelled", prompt_tokens, out.completion_tokens)
        return None
    try:
        work.result()  # re-raise an engine failure
    except Exception as e:
        tracker.failed(e, prompt_tokens, out.completion_tokens)
        raise
    tracker.finish("ok", prompt_tokens, out.completion_tokens)
    return out


def _headers(prepared: Prepared, replicas: set[str] = frozenset()) -> dict[str, str]:
    # Which exact weights answer (name@N, or mix:<hash>): a client can tell versions apart during a swap.
    headers = {"X-Hotpeft-Adapter": prepared.served}
    if replicas:  # Ray Serve: which engine replica(s) generated the answer
        headers["X-Hotpeft-Replica"] = ",".join(sorted(replicas))
    return headers


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(rt: Runtime, prepared: Prepared, choices: OpenChoices, make_chunk, include_usage: bool,
                  usage_chunk, tracker: RequestTracker) -> AsyncIterator[str]:
    completion_tokens = 0
    outcome = "cancelled"  # unless it ends: the client went away
    replicas: set[str] = set()
    try:
        async for i, ev in run_choices(rt, choices):
            if ev.replica and ev.replica not in replicas:  # Ray Serve: an SSE comment, which clients skip
                replicas.add(ev.replica)
                tracker.replica = ev.replica
                yield f": hotpeft-replica {ev.replica}\n\n"
            completion_tokens += len(ev.token_ids)
            tracker.tokens(i, len(ev.token_ids))
            if ev.text or ev.logprobs or ev.prompt_logprobs is not None:
                yield _sse(make_chunk(i, ev.text, None, ev))
            if ev.finish_reason:
                yield _sse(make_chunk(i, "", ev.finish_reason))
        outcome = "ok"
        if include_usage:
            yield _sse(usage_chunk(_usage(prepared.prompt_tokens, completion_tokens)))
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, OpenAI-style
        tracker.failed(e, prepared.prompt_tokens, completion_tokens)
        _, body = describe(e)
        yield _sse(body)
    finally:
        tracker.finish(outcome, prepared.prompt_tokens, completion_tokens)


# 200: a JSON body, or server-sent events with "stream": true
_GENERATION = {200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "the completion"}}


@router.post("/chat/completions", responses=_GENERATION)
async def chat_completions(body: ChatCompletionRequest, request: Request, rt: RuntimeDep):
    tracker, prepared, choices = await _open(rt, "chat", body, prepare_chat)
    headers = _headers(prepared)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    fingerprint = rt.base.fingerprint.rsplit(":", 1)[-1]
    tokens = rt.token_text
    tools = prepared.tools if prepared.tools and prepared.tools.choice != "none" else None
    # chat logprobs cover the message's tokens: not the EOS or stop token that ended it
    enders = rt.eos_ids | set(prepared.params[0].stop_token_ids) if not body.ignore_eos else set(
        prepared.params[0].stop_token_ids)

    def content(entries: list) -> list[dict]:
        return chat_content([e for e in entries if e[0] not in enders], tokens)

    if body.stream:
        calls = [ToolStream(tools.names, tools.parallel) for _ in range(body.n)] if tools else None

        def chunk(i, text, finish, ev=None):
            delta = {"content": text} if finish is None else {}
            if calls:
                if finish is None:
                    text, new = calls[i].feed(text)
                    delta = {"content": text} if text else {}
                    if new:
                        delta["tool_calls"] = new
                else:
                    rest = calls[i].finish()
                    delta = {"content": rest} if rest else {}
                    finish = "tool_calls" if calls[i].calls and finish == "stop" else finish
            shown = content(ev.logprobs) if ev and ev.logprobs else None
            lp = {"content": shown, "refusal": None} if shown else None
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "system_fingerprint": fingerprint,
                    "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        def usage_chunk(usage):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "system_fingerprint": fingerprint, "choices": [], "usage": usage}

        async def events():
            try:
                for i in range(body.n):  # the role comes first, once per choice
                    first = chunk(i, "", None)
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield _sse(first)
                async for s in _stream(rt, prepared, choices, chunk, body.include_usage, usage_chunk, tracker):
                    yield s
            finally:
                tracker.finish("cancelled", prepared.prompt_tokens)  # a no-op unless it left before the tokens

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
    result = await _collect(request, rt, choices, body.n, tracker, prepared.prompt_tokens)
    if result is None:
        return None
    return JSONResponse(headers=_headers(prepared, result.replicas), content={
        "id": rid, "object": "chat.completion", "created": created, "model": body.model,
        "system_fingerprint": fingerprint,
        "choices": [
            {"index": i, **_answer(t, f, tools),
             "logprobs": {"content": content(lp), "refusal": None} if body.logprobs else None}
            for i, (t, f, lp) in enumerate(zip(result.texts, result.finish, result.logprobs))
        ],
        "usage": _usage(prepared.prompt_tokens, result.completion_tokens),
    })


def _answer(text: str, finish: str | None, tools: ToolPlan | None) -> dict:
    """A choice's message and finish reason; with tools, calls in the text become `tool_calls`."""
    if tools is None:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish}
    content, calls = parse_tool_calls(text, tools.names)
    calls = calls if tools.parallel else calls[:1]
    if not calls:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish}
    calls = [{k: v for k, v in c.items() if k != "index"} for c in openai_calls(calls)]  # index: stream deltas only
    return {"message": {"role": "assistant", "content": content, "tool_calls": calls},
            "finish_reason": "tool_calls" if finish == "stop" else finish}


@router.post("/completions", responses=_GENERATION)
async def completions(body: CompletionRequest, request: Request, rt: RuntimeDep):
    tracker, prepared, choices = await _open(rt, "completions", body, prepare_completion)
    headers = _headers(prepared)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    n_choices = len(prepared.prompts) * body.n
    tokens = rt.token_text
    echoed = [prepared.texts[i // body.n] if body.echo else "" for i in range(n_choices)]
    if body.stream:
        offsets = [(0, b"")] * n_choices  # per choice, what text_offset counts from
        sent_echo = [False] * n_choices

        def chunk(i, text, finish, ev=None):
            lp = None
            if body.echo and not sent_echo[i]:  # the prompt goes first
                sent_echo[i] = True
                text = echoed[i] + text
            if ev is not None and body.logprobs is not None:
                legacy = Legacy(tokens, *offsets[i]).add(ev.prompt_logprobs or []).add(ev.logprobs or [])
                offsets[i] = (legacy.base, legacy.raw)  # a character split across events is counted once whole
                lp = legacy.body()
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}

        def usage_chunk(usage):
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [], "usage": usage}

        return StreamingResponse(_stream(rt, prepared, choices, chunk, body.include_usage, usage_chunk, tracker),
                                 media_type="text/event-stream", headers=headers)
    result = await _collect(request, rt, choices, n_choices, tracker, prepared.prompt_tokens)
    if result is None:
        return None

    def legacy(i: int) -> dict | None:
        if body.logprobs is None:
            return None
        return Legacy(tokens).add(result.prompt_logprobs[i] or []).add(result.logprobs[i]).body()

    return JSONResponse(headers=_headers(prepared, result.replicas), content={
        "id": rid, "object": "text_completion", "created": created, "model": body.model,
        "choices": [{"index": i, "text": echoed[i] + t, "logprobs": legacy(i), "finish_reason": f}
                    for i, (t, f) in enumerate(zip(result.texts, result.finish))],
        "usage": _usage(prepared.prompt_tokens, result.completion_tokens),
    })
