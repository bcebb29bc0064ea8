"""OpenAI wire schemas: requests, responses, stream chunks, model cards, errors. Nothing else defines JSON."""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .client import LoadState, ModelKind
from .errors import InvalidRequest
from .sampling import THUDM_DEFAULTS, SamplingParams

OMIT_NONE = dict(default=None, exclude_if=lambda v: v is None)  # optional extras: absent, never null
MAX_STOP_STRINGS = 64  # OpenAI allows 4; be lenient, but bounded
MAX_STOP_CHARS = 256  # per stop string: the held-back tail is matched against its prefixes on every token
MAX_CHOICES = 128


class Role(str, Enum):
    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"
    FUNCTION = "function"


class WireFinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"


class ErrorType(str, Enum):
    INVALID_REQUEST = "invalid_request_error"
    PERMISSION = "permission_error"
    RATE_LIMIT = "rate_limit_error"
    SERVER = "server_error"
    UNAVAILABLE = "unavailable_error"


# ---- requests ---------------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"


StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class GenerationRequest(BaseModel):
    """Fields shared by chat and completions; unknown fields are kept in `model_extra` and logged."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    models: list[str] | None = Field(None, min_length=1)  # fan-out: one target per listed model
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: StopString | list[StopString] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Non-OpenAI extras that vLLM-style clients and benchmarks send.
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, why) for every field we cannot honour; the route turns the first into a 400."""
        out = []
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported by this server"))
        if not self.skip_special_tokens:
            out.append(("skip_special_tokens", "ChatGLM2 special tokens always decode to empty text"))
        if self.stream_options is not None and not self.stream:
            out.append(("stream_options", "stream_options is only allowed when stream is true"))
        for name in _UNSUPPORTED_EXTRAS:
            if (self.model_extra or {}).get(name) not in (None, False, [], {}):
                out.append((name, f"{name} is not supported by this server"))
        return out

    def ignored_fields(self) -> list[str]:
        return sorted(k for k in (self.model_extra or {}) if k not in _UNSUPPORTED_EXTRAS)

    def target_models(self) -> list[str]:
        return list(self.models) if self.models else [self.model]

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop has {len(stops)} entries; at most {MAX_STOP_STRINGS} are allowed", "stop")
        if any(s == "" for s in stops):
            raise InvalidRequest("stop strings must not be empty", "stop")
        return stops

    def num_prompts(self) -> int:
        return 1

    def _sampling(self, defaults: dict[str, Any], max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        choices = self.n * len(self.target_models())
        if choices > MAX_CHOICES:
            raise InvalidRequest(f"n times the number of models must be at most {MAX_CHOICES}", "n")
        if choices * self.num_prompts() > MAX_CHOICES:
            raise InvalidRequest(f"{self.num_prompts()} prompts times n times the number of models must be at most "
                                 f"{MAX_CHOICES}", "prompt")
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens ({self.min_tokens}) is larger than max_tokens ({max_tokens})",
                                 "min_tokens")
        top_k = defaults.get("top_k", 0) if self.top_k is None else max(self.top_k, 0)  # -1 (vLLM) = off
        return SamplingParams(
            temperature=defaults.get("temperature", 1.0) if self.temperature is None else self.temperature,
            top_p=defaults.get("top_p", 1.0) if self.top_p is None else self.top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            seed=self.seed,
            n=self.n,
            logprobs=logprobs,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


# Known OpenAI / vLLM fields we cannot honour: a non-empty value is a 400, never silently dropped.
_UNSUPPORTED_EXTRAS = (
    "tools", "functions", "audio", "prediction", "web_search_options", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "structured_outputs", "use_beam_search", "min_p", "typical_p",
    "length_penalty", "prompt_logprobs", "reasoning_effort", "lora_request",
)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tool_choice: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.response_format is not None and self.response_format.type != "text":
            out.append(("response_format", f"response_format type {self.response_format.type!r} is not supported; "
                                           "only 'text'"))
        if self.tool_choice not in (None, "none"):
            out.append(("tool_choice", "tool calling is not supported by this server"))
        if self.function_call not in (None, "none"):
            out.append(("function_call", "function calling is not supported by this server"))
        if self.modalities not in (None, ["text"]):
            out.append(("modalities", "only the 'text' modality is supported"))
        if self.top_logprobs is not None and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs requires logprobs to be true"))
        return out

    def to_sampling_params(self) -> SamplingParams:
        """Chat defaults follow THUDM's chat() (temperature 0.8, top_p 0.8, top_k 50) when unset."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(THUDM_DEFAULTS, max_tokens, logprobs)


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(GenerationRequest):
    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def num_prompts(self) -> int:
        """A list of strings or of id lists is one prompt per entry; a string or one id list is one prompt."""
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            return len(self.prompt)
        return 1

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "echo is not supported by this server"))
        if self.suffix:
            out.append(("suffix", "suffix (fill-in-the-middle) is not supported by ChatGLM2"))
        if self.best_of is not None and self.best_of != self.n:
            out.append(("best_of", "best_of other than n is not supported"))
        return out

    def to_sampling_params(self) -> SamplingParams:
        """OpenAI defaults (temperature 1, top_p 1, max_tokens 16): completions are raw text."""
        return self._sampling({}, self.max_tokens, self.logprobs)


class AdapterRequest(BaseModel):
    """Admin body: `name` is the model id; `path` (load only) is relative to the checkpoints folder."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    path: str | None = Field(None, min_length=1, max_length=400)


# ---- responses --------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(**OMIT_NONE)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: WireFinishReason
    model: str | None = Field(**OMIT_NONE)  # fan-out only: which model produced this choice


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = Field(**OMIT_NONE)
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(**OMIT_NONE)
    content: str | None = Field(**OMIT_NONE)


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: WireFinishReason | None = None
    model: str | None = Field(**OMIT_NONE)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = Field(**OMIT_NONE)
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # the key is dropped unless stream_options.include_usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: WireFinishReason | None = None
    model: str | None = Field(**OMIT_NONE)


class CompletionResponse(BaseModel):
    """Both the non-stream body and every stream chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = Field(**OMIT_NONE)
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- models, health, errors -------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    kind: ModelKind
    state: LoadState
    pre_seq_len: int = 0
    prefix_projection: bool = False
    version: str = ""
    fingerprint: str = ""
    error: str | None = Field(**OMIT_NONE)
    warnings: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: ErrorType
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
