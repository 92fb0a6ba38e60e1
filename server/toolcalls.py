"""Tool calling on the HTTP side: check `tools` and `tool_choice`, constrain or parse the calls.

`none`: the tools are left out of the prompt and the answer is text. `auto` (the default with
tools): the model answers in text or calls; calls in its answer (`model/chat.py`'s format, or
the template's own when it knows tools and writes the same blocks) are parsed into `tool_calls`
with `finish_reason: "tool_calls"`. `required` and a named function: the answer is constrained by
a grammar to one call (or several, with `parallel_tool_calls`) of a listed function whose
arguments validate against its `parameters` schema.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from hotpeft.model.chat import CALL_CLOSE, CALL_OPEN, as_call, block_at, call_grammar_schema
from hotpeft.server.errors import InvalidRequest
from hotpeft.server.structured import _checked, _sized, from_schema

_NO_FREE_SPACE = {"whitespace_flexible": False}


@dataclass
class ToolPlan:
    tools: list[dict]  # as the template renders them (empty with tool_choice none)
    names: set[str]
    choice: str  # none | auto | required | named
    grammar: str | None = None  # required / named: the calls' grammar
    parallel: bool = True  # parallel_tool_calls: more than one call per answer


def plan_tools(req, limit: int) -> ToolPlan | None:
    """None when the request has no tools."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice requires tools", param="tool_choice", code="invalid_value")
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    _sized(json.dumps(tools), "tools", limit)
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InvalidRequest(f"tools: the function name {dup!r} is given twice", param="tools", code="invalid_value")
    for i, t in enumerate(tools):
        params = t["function"].get("parameters")
        if params is not None:
            if params.get("type", "object") != "object":
                raise InvalidRequest(f"tools.{i}.function.parameters must be a JSON schema of an object (the "
                                     f"arguments), not of type {params.get('type')!r}",
                                     param=f"tools.{i}.function.parameters", code="invalid_value")
            from_schema(params, f"tools.{i}.function.parameters", limit)
    parallel = req.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan([], set(), "none")
    if choice is None or choice == "auto":
        return ToolPlan(tools, set(names), "auto", parallel=parallel)
    if choice != "required":
        if choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                                 f"({', '.join(names)})", param="tool_choice", code="invalid_value")
        tools_called = [t for t in tools if t["function"]["name"] == choice.function.name]
    else:
        tools_called = tools
    if req.response_format is not None and req.response_format.type != "text" or req.structured_outputs is not None:
        raise InvalidRequest("tool_choice required or a named function constrains the answer already: give no "
                             "response_format or structured_outputs with it", param="tool_choice")
    schema = {**call_grammar_schema(tools_called), "x-guidance": _NO_FREE_SPACE}
    many = parallel and choice == "required"
    lark = (f"start: call{'+' if many else ''}\n"
            f"call: {json.dumps(CALL_OPEN)} %json {json.dumps(schema)} {json.dumps(CALL_CLOSE)}")
    from llguidance import LLMatcher
    grammar = _checked(LLMatcher.grammar_from_lark(lark), "tools")
    return ToolPlan(tools, set(names), "named" if choice != "required" else "required", grammar, parallel=many)


def openai_calls(calls: list[dict], start: int = 0) -> list[dict]:
    return [{"index": start + k, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for k, c in enumerate(calls)]


@dataclass
class ToolStream:
    """One choice's streamed text, split into content and calls as it comes: text that may be the
    start of a call is held back until it is one (or is not)."""

    names: set[str]
    parallel: bool = True  # false: calls after the first are dropped
    held: str = ""
    calls: list[dict] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content to send now, calls completed now in OpenAI's delta shape). As for a whole
        answer, text after the first call is dropped."""
        self.held += text
        out, new = "", []
        while True:
            start = self.held.find(CALL_OPEN)
            if start < 0:
                keep = _partial_open(self.held)
                out += self._free(self.held[:len(self.held) - keep])
                self.held = self.held[len(self.held) - keep:]
                break
            found = block_at(self.held, start, final=False)
            if found is None:  # inside a call: wait for its end
                out += self._free(self.held[:start])
                self.held = self.held[start:]
                break
            end, body = found
            out += self._free(self.held[:start])
            call = as_call(body, self.names)
            if call is not None and (self.parallel or not self.calls):
                calls = openai_calls([call], len(self.calls))
                self.calls += calls
                new += calls
            elif call is None:
                out += self._free(self.held[start:end])
            self.held = self.held[end:]
        return out, new

    def _free(self, text: str) -> str:
        return "" if self.calls else text

    def finish(self) -> str:
        """What is still held back (an unfinished call stays text, unless calls came before it)."""
        rest, self.held = self.held, ""
        return self._free(rest)


def _partial_open(text: str) -> int:
    """Characters at the end of `text` that could begin CALL_OPEN."""
    for k in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-k:]):
            return k
    return 0
