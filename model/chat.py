"""Conversations with tools, rendered one way for serving and for training.

OpenAI's shapes in, template text out. A chat template that knows tools (it reads `tools`, as
Qwen's, Llama 3's and Mistral's do) gets them as `tools=` and the messages as transformers
expects them (tool-call arguments as objects). A template that does not (SmolLM2's, the default
model's) gets hotpeft's default tool prompt, written in the system message:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

is how the model is told to call, and how an assistant turn with `tool_calls` is written in the
history; a `tool` message becomes a user turn `<tool_response>...</tool_response>`. The trainer
renders training lines with the same functions, so an adapter trained on them calls tools the
way the server parses them (`parse_tool_calls`).
"""
from __future__ import annotations

import json

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

TOOL_PROMPT = (
    "You can call functions. To call one, answer with only\n"
    + CALL_OPEN + '{"name": <function name>, "arguments": <JSON object of arguments>}' + CALL_CLOSE
    + "\nOne such block per call. The functions:\n"
)


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tool_prompt(tools: list[dict]) -> str:
    """The default tool prompt: how to call, then one JSON line per function."""
    lines = [json.dumps({k: v for k, v in t["function"].items() if v is not None}, ensure_ascii=False)
             for t in tools]
    return TOOL_PROMPT + "\n".join(lines)


def call_text(name: str, arguments) -> str:
    """One call as the default tool prompt writes it; `arguments` a JSON string or an object."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return CALL_OPEN + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + CALL_CLOSE


def _arguments(call: dict):
    args = call["function"].get("arguments")
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        return args


def template_messages(messages: list[dict], tools: list[dict] | None, native: bool) -> list[dict]:
    """OpenAI messages (role, content, tool_calls, tool_call_id) -> what the chat template renders."""
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{"type": "function", "id": c.get("id"), "function": {
                    "name": c["function"]["name"], "arguments": _arguments(c)}} for c in m["tool_calls"]]
            out.append(m)
        return out
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content += "".join(call_text(c["function"]["name"], _arguments(c)) for c in m["tool_calls"])
        elif role == "tool":
            role, content = "user", f"<tool_response>{content}</tool_response>"
        out.append({"role": role, "content": content})
    if tools:
        prompt = tool_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, template: str | None = None,
           add_generation_prompt: bool = True) -> str:
    """The conversation as the chat template (`template`, else the tokenizer's) writes it."""
    native = template_knows_tools(template or getattr(tokenizer, "chat_template", None))
    kwargs = {"tools": tools} if native and tools else {}
    return tokenizer.apply_chat_template(template_messages(messages, tools, native), chat_template=template,
                                         add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)


_DECODER = json.JSONDecoder()


def block_at(text: str, start: int, final: bool = True) -> tuple[int, object] | None:
    """The call block that opens at `start`: (its end, its JSON body, or None when the block is not
    JSON); None when it is not finished yet (`final`: the text is whole, so it never will be).
    Arguments may contain the closing tag inside a JSON string."""
    j = start + len(CALL_OPEN)
    close = text.find(CALL_CLOSE, j)
    if close >= 0:
        try:
            return close + len(CALL_CLOSE), json.loads(text[j:close])
        except json.JSONDecodeError:
            pass
    rest = len(text) - len(text[j:].lstrip())
    try:
        body, k = _DECODER.raw_decode(text, rest)
    except json.JSONDecodeError as e:
        if not final and (close < 0 or e.pos >= len(text) - 1 or e.msg.startswith("Unterminated")):
            return None
        return (close + len(CALL_CLOSE), None) if close >= 0 else None
    k += len(text[k:]) - len(text[k:].lstrip())
    if text.startswith(CALL_CLOSE, k):
        return k + len(CALL_CLOSE), body
    if not final and len(text) - k < len(CALL_CLOSE) and CALL_CLOSE.startswith(text[k:]):
        return None
    later = text.find(CALL_CLOSE, k)
    return (later + len(CALL_CLOSE), None) if later >= 0 else None


def as_call(body, names: set[str]) -> dict | None:
    """{"name", "arguments": JSON text} when `body` calls a listed function with an object of arguments."""
    if not isinstance(body, dict) or body.get("name") not in names or not isinstance(body.get("arguments", {}), dict):
        return None
    return {"name": body["name"], "arguments": json.dumps(body.get("arguments", {}), ensure_ascii=False)}


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(content before the calls or None, [{"name", "arguments": JSON string}]) of a model's answer.
    A block that is not JSON, or names no listed function, stays in the text."""
    calls, first, pos = [], None, 0
    while (start := text.find(CALL_OPEN, pos)) >= 0:
        found = block_at(text, start)
        if found is None:
            break
        end, body = found
        call = as_call(body, names)
        if call is not None:
            calls.append(call)
            first = start if first is None else first
        pos = end
    if not calls:
        return text, []
    content = text[:first].strip()
    return content or None, calls


def call_grammar_schema(tools: list[dict]) -> dict:
    """A JSON schema of one call of any of `tools` (name first, then its arguments)."""
    options = []
    for t in tools:
        f = t["function"]
        params = f.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}
