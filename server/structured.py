"""Structured outputs, on the HTTP side: a request's constraint as one llguidance grammar, checked.

`response_format` (OpenAI: `json_object`, `json_schema`) and the `structured_outputs` extension
(vLLM's fields: `json`, `regex`, `choice`, `grammar` in llguidance's Lark dialect) become the
grammar text a row carries to the engine (`SamplingParams.grammar`), where llguidance masks each
token (`engine/grammar.py`). A grammar that does not compile is a 400 here, naming the field and
llguidance's reason; nothing reaches the engine. JSON is generated compactly (no free
whitespace: a model cannot spend its tokens on spaces).
"""
from __future__ import annotations

import json

from hotpeft.server.errors import InvalidRequest

JSON_OPTIONS = {"whitespace_flexible": False}


def _llg():
    import llguidance
    return llguidance


def _sized(text: str, param: str, limit: int) -> None:
    size = len(text.encode())
    if size > limit:
        raise InvalidRequest(f"{param} is {size} bytes; this server accepts at most {limit} (--max-schema-bytes)",
                             param=param, code="invalid_value")


def _checked(grammar: str, param: str) -> str:
    is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequest(f"{param} cannot constrain decoding: {messages[0].strip()}", param=param,
                             code="invalid_value")
    return grammar


def from_schema(schema, param: str, limit: int) -> str:
    text = json.dumps(schema if schema is not None else {}, ensure_ascii=False)
    _sized(text, param, limit)
    try:
        grammar = _llg().LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"{param} is not a JSON schema: {e}", param=param, code="invalid_value") from e
    return _checked(grammar, param)


def grammar_for(req, limit: int) -> str | None:
    """The grammar of `req` (a chat or completion request), or None when its output is free."""
    fmt, so = req.response_format, req.structured_outputs
    if fmt is not None and fmt.type != "text" and so is not None:
        raise InvalidRequest("give response_format or structured_outputs, not both", param="structured_outputs")
    if fmt is not None and fmt.type == "json_object":
        return from_schema({"type": "object"}, "response_format", limit)
    if fmt is not None and fmt.type == "json_schema":
        return from_schema(fmt.json_schema.schema_, "response_format.json_schema.schema", limit)
    if so is None:
        return None
    llg = _llg().LLMatcher
    if so.json_ is not None:
        return from_schema(so.json_, "structured_outputs.json", limit)
    if so.regex is not None:
        _sized(so.regex, "structured_outputs.regex", limit)
        return _checked(llg.grammar_from_regex(so.regex), "structured_outputs.regex")
    if so.choice is not None:
        _sized(json.dumps(so.choice), "structured_outputs.choice", limit)
        return _checked(_llg().grammar_from("choice", json.dumps(so.choice)), "structured_outputs.choice")
    _sized(so.grammar, "structured_outputs.grammar", limit)
    return _checked(llg.grammar_from_lark(so.grammar), "structured_outputs.grammar")
