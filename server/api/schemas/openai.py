"""Request and response bodies of the OpenAI-compatible API."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

# OpenAI parameters we know but do not implement: accepted only at their "off" value, so a
# client that sends one for real gets a clear 400 instead of a silently different answer.
_UNSUPPORTED_UNLESS_OFF: dict[str, tuple] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "best_of": (None, 1),
    "echo": (None, False),
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
                        "stream_options, presence_penalty, frequency_penalty, logit_bias; extensions: "
                        "repetition_penalty, min_tokens, stop_token_ids, ignore_eos)", {"param": key})
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

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
    prompt: str | list[str] = Field()

    @field_validator("prompt")
    @classmethod
    def _non_empty_list(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

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
