"""Request and response bodies of the OpenAI-compatible API."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

# OpenAI parameters we know but do not implement: accepted only at their "off" value, so a
# client that sends one for real gets a clear 400 instead of a silently different answer.
_UNSUPPORTED_UNLESS_OFF: dict[str, tuple] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="an adapter name, or name@N")
    weight: float = Field(allow_inf_nan=False)


MergeStrategy = Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None  # constrained either way: the output always validates


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


class StructuredOutputs(BaseModel):
    """Extension (vLLM's name and fields): constrain the output to one of these."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | bool | None = Field(None, alias="json", description="a JSON schema")
    regex: str | None = Field(None, min_length=1, description="a regular expression the whole output matches")
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1, description="one of these")
    grammar: str | None = Field(None, min_length=1, description="a Lark grammar (llguidance's dialect)")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar")
        return self


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # null is "off", as OpenAI allows
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    # token id (as a string, as OpenAI sends it) -> bias added to its logit
    logit_bias: dict[Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,8})$")],
                     Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = Field(
        None, max_length=1024)
    # Extensions (as in vLLM): CTRL's repetition penalty over prompt and output tokens; EOS and
    # stop_token_ids refused before min_tokens; tokens that end the choice like EOS.
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0, allow_inf_nan=False)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    # Extension (as in vLLM): keep sampling past EOS up to max_tokens; for benchmarks.
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Extension: a weighted mix of LoRA adapters for this request (PEFT's add_weighted_adapter
    # semantics), built on the fly and cached by its recipe; `model` is then the base.
    adapters: list[AdapterWeight] | None = Field(None, min_length=1)
    merge_strategy: MergeStrategy = "linear"
    merge_density: float | None = Field(None, gt=0.0, le=1.0, description="ties and dare_*: fraction of entries kept")
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, off in _UNSUPPORTED_UNLESS_OFF.items():
                if key in data and data[key] not in off:
                    # The error names the parameter (`param`), as OpenAI's errors do.
                    raise PydanticCustomError(
                        "unsupported_parameter", "'{param}' is not supported by hotpeft (supported: model, "
                        "messages/prompt, max_tokens, max_completion_tokens, temperature, top_p, n, seed, stop, stream, "
                        "stream_options, presence_penalty, frequency_penalty, logit_bias, logprobs, top_logprobs, "
                        "echo, response_format, tools, tool_choice, parallel_tool_calls; extensions: "
                        "structured_outputs, repetition_penalty, min_tokens, stop_token_ids, ignore_eos)",
                        {"param": key})
            data = {k: v for k, v in data.items() if k not in _UNSUPPORTED_UNLESS_OFF}
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments (an object)
    strict: bool | None = None  # calls are constrained to the schema with tool_choice required or named


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None  # each output token's logprob (raw: before penalties, masks, temperature)
    top_logprobs: int | None = Field(None, ge=0, le=20)  # and this many most likely alternatives
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool | None = None  # default true: more than one call in an answer

    @model_validator(mode="after")
    def _one_max(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give max_tokens or max_completion_tokens, not both with different values")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    # text, texts, token ids or lists of token ids (as OpenAI accepts, and lm-evaluation-harness sends)
    prompt: str | list[str] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]] = Field()
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy shape: the sampled token's and this many alternatives
    echo: bool = False  # the prompt (and with logprobs, its tokens' logprobs) before the completion

    @field_validator("prompt")
    @classmethod
    def _non_empty_list(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must be a string, a non-empty list of strings, a non-empty list of token ids, "
                             "or a non-empty list of non-empty lists of token ids")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or as token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None
    # hotpeft's additions (the openai client keeps extra fields)
    kind: str
    version: int | None = None
    precision: str | None = None
    resident_bytes: int | None = None
    device: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- errors, as every route may answer them ----------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


_ERRORS = {
    400: "invalid request: the field is named in `param`",
    401: "missing or incorrect key (servers started with --api-key / --admin-key)",
    403: "this key may not call this route, or the path is outside every --import-root",
    404: "no such model, adapter, file or job",
    409: "conflict with the current state (an adapter for another base, a job that cannot be cancelled)",
    413: "body or upload over its limit (--max-body-bytes, --max-adapter-bytes, --max-file-bytes)",
    429: "too many waiting requests (--max-queue): retry after the Retry-After header",
    500: "the server failed this request (an engine step failed, stored adapter files unreadable)",
    503: "shutting down, out of memory for this batch, or not ready",
}
ERROR_RESPONSES: dict = {status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()}
