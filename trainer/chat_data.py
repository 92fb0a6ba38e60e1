"""Chat lines of a training file: OpenAI's chat fine-tuning format, function calling included.

    {"messages": [...], "tools": [{"type": "function", "function": {"name", "description", "parameters"}}],
     "parallel_tool_calls": true}

An assistant message may carry `"tool_calls": [{"id", "type": "function", "function": {"name",
"arguments": "<JSON object as text>"}}]` (its content then null or absent); a `"role": "tool"`
message answers one of those calls by `tool_call_id`. `parallel_tool_calls` is accepted and
ignored (a line shows by its own calls whether they come one or several at a time).

Lines are checked here, and rendered with `hotpeft.model.chat.render`, the function the server
renders a chat request with: tools and messages are normalised to what the server hands it (tools
as its schema dumps them, content null as ""), so the text trained on is the text served.
"""
from __future__ import annotations

import json
import re

from hotpeft.model.chat import render
from hotpeft.trainer.errors import DatasetInvalid

ROLES = ("system", "developer", "user", "assistant", "tool")
LINE_FIELDS = {"messages", "tools", "parallel_tool_calls"}
MESSAGE_FIELDS = {"role", "content", "weight", "name", "tool_calls", "tool_call_id"}
FUNCTION_FIELDS = ("name", "description", "parameters", "strict")  # the order the server's schema dumps them in
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def line_error(what: str, line: int, message: str) -> DatasetInvalid:
    return DatasetInvalid(f"{what}, line {line}: {message}", line=line)


def parse_chat(obj: dict, what: str, line: int) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools or None) of a {"messages": ...} line, checked and normalised."""
    extra = set(obj) - LINE_FIELDS
    if extra:
        hint = " (the legacy 'functions' format is not read: give 'tools')" if "functions" in extra else ""
        raise line_error(what, line, f"unexpected field(s) {', '.join(sorted(extra))} beside 'messages'{hint}")
    if obj.get("parallel_tool_calls") is not None and not isinstance(obj["parallel_tool_calls"], bool):
        raise line_error(what, line, f"'parallel_tool_calls' must be true or false, got {obj['parallel_tool_calls']!r}")
    tools = parse_tools(obj["tools"], what, line) if obj.get("tools") is not None else None
    return parse_messages(obj["messages"], tools, what, line), tools


def parse_tools(value, what: str, line: int) -> list[dict]:
    """Tool definitions as the server's request schema keeps them (type, then the function's fields)."""
    if not isinstance(value, list) or not value:
        raise line_error(what, line, "'tools' must be a non-empty list of {\"type\": \"function\", \"function\": "
                                     "{\"name\", \"description\", \"parameters\"}} objects (leave it out for none)")
    out, names = [], set()
    for i, t in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise line_error(what, line, f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}")
        extra = set(t) - {"type", "function"}
        if extra:
            raise line_error(what, line, f"{where} has unsupported field(s) {', '.join(sorted(extra))}")
        f = t["function"]
        extra = set(f) - set(FUNCTION_FIELDS)
        if extra:
            raise line_error(what, line, f"{where}.function has unsupported field(s) {', '.join(sorted(extra))}; "
                                         f"allowed: {', '.join(FUNCTION_FIELDS)}")
        name = f.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise line_error(what, line, f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got {name!r}")
        if name in names:
            raise line_error(what, line, f"{where}: the function name {name!r} is given twice")
        names.add(name)
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise line_error(what, line, f"{where}.function.description must be a string")
        if f.get("strict") is not None and not isinstance(f["strict"], bool):
            raise line_error(what, line, f"{where}.function.strict must be true or false")
        _check_parameters(f.get("parameters"), f"{where}.function.parameters", what, line)
        out.append({"type": "function", "function": {k: f[k] for k in FUNCTION_FIELDS if f.get(k) is not None}})
    return out


def _check_parameters(schema, where: str, what: str, line: int) -> None:
    """The outline of an arguments schema: an object schema whose properties and required list are sound."""
    if schema is None:
        return
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise line_error(what, line, f"{where} must be a JSON schema of an object, e.g. {{\"type\": \"object\", "
                                     f"\"properties\": {{\"city\": {{\"type\": \"string\"}}}}}}, got {schema!r}")
    if not isinstance(schema.get("properties", {}), dict):
        raise line_error(what, line, f"{where}.properties must be an object of property schemas")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise line_error(what, line, f"{where}.required must be a list of property names")


def _parse_calls(value, i: int, tools: list[dict] | None, what: str, line: int) -> list[dict]:
    """An assistant message's tool_calls, as the server's schema dumps them: {"id", "type", "function"}."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(value, list) or not value:
        raise line_error(what, line, f"{where} must be a non-empty list of calls")
    functions = {t["function"]["name"]: t["function"] for t in tools or []}
    out = []
    for k, c in enumerate(value):
        at = f"{where}[{k}]"
        shaped = isinstance(c, dict) and isinstance(c.get("function"), dict) and c.get("type", "function") == "function"
        if not shaped:
            raise line_error(what, line, f"{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                         "\"arguments\"}}")
        if not isinstance(c.get("id"), str) or not c["id"]:
            raise line_error(what, line, f"{at}.id must be a non-empty string (the tool message's tool_call_id)")
        name = c["function"].get("name")
        if not functions:
            raise line_error(what, line, f"{at} calls {name!r} but the line has no 'tools'; define the function "
                                         "in \"tools\"")
        if name not in functions:
            raise line_error(what, line, f"{at}.function.name {name!r} is not in tools ({', '.join(functions)})")
        args = c["function"].get("arguments")
        try:
            parsed = json.loads(args) if isinstance(args, str) else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise line_error(what, line, f"{at}.function.arguments must be a JSON object as a string, e.g. "
                                         f"\"{{\\\"city\\\": \\\"Paris\\\"}}\", got {args!r}")
        _check_arguments(parsed, functions[name].get("parameters"), f"{at}.function.arguments", what, line)
        out.append({"id": c["id"], "type": "function", "function": {"name": name, "arguments": args}})
    return out


def _check_arguments(args: dict, schema: dict | None, where: str, what: str, line: int) -> None:
    """Required arguments present; none unknown where the schema forbids others. The full JSON Schema
    check is the server's (calls constrained with tool_choice required or named)."""
    if schema is None:
        return
    missing = [r for r in schema.get("required", []) if r not in args]
    if missing:
        raise line_error(what, line, f"{where} lacks the required argument(s) {', '.join(missing)}")
    known = schema.get("properties", {})
    unknown = [a for a in args if a not in known]
    if unknown and schema.get("additionalProperties") is False:
        raise line_error(what, line, f"{where} has argument(s) {', '.join(unknown)} that the function's parameters "
                                     f"do not define ({', '.join(known) or 'none'})")


def _parse_message(m, i: int, tools: list[dict] | None, open_calls: set[str], what: str, line: int) -> dict:
    """One message checked; `open_calls` (ids of calls not yet answered) is updated."""
    if not isinstance(m, dict):
        raise line_error(what, line, f"messages[{i}] must be an object with 'role' and 'content'")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise line_error(what, line, f"messages[{i}] has unknown role {role!r}; roles: {', '.join(ROLES)}")
    extra = set(m) - MESSAGE_FIELDS
    if extra:
        raise line_error(what, line, f"messages[{i}] has unsupported field(s) {', '.join(sorted(extra))}")
    calls = m.get("tool_calls")
    if calls is not None and role != "assistant":
        raise line_error(what, line, f"messages[{i}].tool_calls is allowed on assistant messages only")
    if "tool_call_id" in m and role != "tool":
        raise line_error(what, line, f"messages[{i}].tool_call_id is allowed on tool messages only")
    if not isinstance(content, str) and not (calls is not None and content is None):
        raise line_error(what, line, f"messages[{i}] ({role}) needs 'content' as a string" +
                         (" (null only beside tool_calls)" if role == "assistant" else ""))
    weight = m.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise line_error(what, line, f"messages[{i}].weight must be 0 or 1, got {weight!r}")
    if "weight" in m and role != "assistant":
        raise line_error(what, line, f"messages[{i}].weight is allowed on assistant messages only")
    out = {"role": "system" if role == "developer" else role, "content": content or "", "weight": weight}
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str):
            raise line_error(what, line, f"messages[{i}] (tool) needs 'tool_call_id', the id of the call it answers")
        if call_id not in open_calls:
            raise line_error(what, line, f"messages[{i}] (tool) answers {call_id!r}, but no preceding assistant "
                                         "message has an unanswered tool call with that id")
        open_calls.discard(call_id)
        out["tool_call_id"] = call_id
    elif calls is not None:
        out["tool_calls"] = _parse_calls(calls, i, tools, what, line)
        open_calls.clear()  # results answer the latest calls only
        open_calls.update(c["id"] for c in out["tool_calls"])
    else:
        open_calls.clear()
    return out


def parse_messages(value, tools: list[dict] | None, what: str, line: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise line_error(what, line, "'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    open_calls: set[str] = set()
    out = [_parse_message(m, i, tools, open_calls, what, line) for i, m in enumerate(value)]
    ids = [c["id"] for m in out for c in m.get("tool_calls", [])]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise line_error(what, line, f"the tool call id {dup!r} is used twice; each call needs its own id")
    if not any(m["role"] == "assistant" and m["weight"] for m in out):
        raise line_error(what, line, "no assistant message to train on (each example needs one without \"weight\": 0)")
    return out


def chat_segments(messages: list[dict], tools: list[dict] | None, line: int, tokenizer,
                  template) -> tuple[list[tuple[str, bool]], int, str]:
    """(text, trained) pieces of a rendered conversation; the index of the last trained piece; its reference.

    Rendered incrementally: the prompt before each assistant turn (with the generation prompt, as
    the server renders a request), then that turn. The reference of a turn with tool calls is its
    rendered text as evaluation decodes a generation (special tokens dropped, stripped): a call
    generated token for token matches it exactly."""
    msgs = [dict(m, content=template(m["content"])) if m["role"] == "user" else m for m in messages]
    conversation = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    pieces: list[tuple[str, bool]] = []
    done = ""
    last, reference = -1, ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, conversation[:i], tools, add_generation_prompt=True)
        full = render(tokenizer, conversation[:i + 1], tools, add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DatasetInvalid(f"line {line}: the chat template does not render this conversation "
                                 "incrementally; the assistant turns cannot be located", line=line)
        if len(prefix) > len(done):
            pieces.append((prefix[len(done):], False))
        turn = full[len(prefix):]
        pieces.append((turn, bool(m["weight"])))
        if m["weight"]:
            last = len(pieces) - 1
            reference = m["content"] if "tool_calls" not in m else tokenizer.decode(
                tokenizer(turn, add_special_tokens=False)["input_ids"], skip_special_tokens=True).strip()
        done = full
    return pieces, last, reference
