"""Per-choice output state and the wire renderings built from it: one JSON response or SSE chunks.

Chat answers go through THUDM's process_response (strip, fill in [[训练时间]]) incrementally, so the
streamed deltas concatenate to exactly the non-stream content."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import EngineDead
from .http_errors import ShuttingDown
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                       ChatLogprobs, ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionResponse, Delta,
                       PromptTokensDetails, TopLogprob, Usage, WireFinishReason)
from .sampling import SamplingParams
from .sequence import FinishReason, RequestOutput, TokenLogprob

PLACEHOLDER, PLACEHOLDER_VALUE = "[[训练时间]]", "2023年"  # THUDM process_response


class Endpoint(str, Enum):
    CHAT = "chat"
    COMPLETION = "completion"


class ResponseTrimmer:
    """Streaming `process_response`: drops leading whitespace, holds back trailing whitespace and any
    tail that could still become the placeholder; `flush` drops the final trailing whitespace."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        buf = (self.pending + text).replace(PLACEHOLDER, PLACEHOLDER_VALUE)
        stable = buf.rstrip()
        if len(stable) == len(buf):
            stable = stable[:len(stable) - _partial_suffix(stable, PLACEHOLDER)]
        self.pending = buf[len(stable):]
        return stable

    def flush(self) -> str:
        out, self.pending = self.pending.rstrip(), ""
        return out


def _partial_suffix(text: str, word: str) -> int:
    """Length of the longest proper prefix of `word` that `text` ends with."""
    for k in range(min(len(text), len(word) - 1), 0, -1):
        if text.endswith(word[:k]):
            return k
    return 0


@dataclass
class Job:
    """One validated generation request, ready for engine.generate."""

    endpoint: Endpoint
    response_id: str
    created: int
    model: str  # echoed back as the request named it
    target_models: list[str]
    prompt_lens: list[int]
    params: SamplingParams
    fingerprint: str | None
    stream: bool
    include_usage: bool
    fan_out: bool

    @property
    def num_choices(self) -> int:
        return len(self.target_models) * self.params.n

    def target_of(self, index: int) -> int:
        return index // self.params.n

    def model_of(self, index: int) -> str:
        return self.target_models[self.target_of(index)]


@dataclass
class ChoiceState:
    index: int
    trimmer: ResponseTrimmer | None
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    started: bool = False
    offset: int = 0  # characters emitted so far (completions text_offset)

    def push(self, out: RequestOutput) -> str:
        text = out.text
        if self.trimmer is not None:
            text = self.trimmer.push(text) + (self.trimmer.flush() if out.finished else "")
        self.parts.append(text)
        self.logprobs.extend(out.logprobs or [])
        self.tokens = max(self.tokens, out.completion_tokens)
        self.prompt_tokens = max(self.prompt_tokens, out.prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, out.cached_tokens)
        if out.finish_reason is FinishReason.ABORT:
            raise ShuttingDown("Generation was stopped before it finished: the server is shutting down.")
        self.finish = out.finish_reason
        return text


def wire_finish(reason: FinishReason | None) -> WireFinishReason | None:
    return None if reason is None else WireFinishReason(reason.value)


def token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[ChatTokenLogprob(
        token=t.token, logprob=t.logprob, bytes=token_bytes(t.token),
        top_logprobs=[TopLogprob(token=s, logprob=lp, bytes=token_bytes(s)) for _, s, lp in t.top])
        for t in items])


def completion_logprobs(items: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs(top_logprobs=[])
    for t in items:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({s: lp for _, s, lp in t.top})
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


class Renderer:
    """Builds the JSON of one request's chunks and final response from its ChoiceStates."""

    def __init__(self, job: Job, want_logprobs: bool):
        self.job = job
        self.want_logprobs = want_logprobs
        trim = job.endpoint is Endpoint.CHAT
        self.states = [ChoiceState(i, ResponseTrimmer() if trim else None) for i in range(job.num_choices)]

    def _model_field(self, index: int) -> str | None:
        return self.job.model_of(index) if self.job.fan_out else None

    def usage(self) -> Usage:
        prompt = list(self.job.prompt_lens)
        cached = [0] * len(prompt)
        for s in self.states:
            t = self.job.target_of(s.index)
            prompt[t] = max(prompt[t], s.prompt_tokens) if s.prompt_tokens else prompt[t]
            cached[t] = max(cached[t], s.cached_tokens)
        completion = sum(s.tokens for s in self.states)
        return Usage(prompt_tokens=sum(prompt), completion_tokens=completion, total_tokens=sum(prompt) + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached)))

    def check_complete(self) -> None:
        missing = [s.index for s in self.states if s.finish is None]
        if missing:
            raise EngineDead(f"The engine ended the request before choice {missing[0]} finished.")

    # ---- streaming ----------------------------------------------------------------------------
    def _dump(self, chunk: ChatCompletionChunk | CompletionResponse) -> str:
        return chunk.model_dump_json(exclude=None if self.job.include_usage else {"usage"})

    def chunks(self, out: RequestOutput) -> list[str]:
        """SSE data payloads for one engine output (maybe none: text held back, nothing to say)."""
        job, state = self.job, self.states[out.index]
        events = []
        if job.endpoint is Endpoint.CHAT and not state.started:  # the role travels with the first token
            events.append(self._chat_chunk(ChatChunkChoice(index=out.index, delta=Delta(role="assistant", content=""),
                                                           model=self._model_field(out.index))))
        state.started = True
        start_offset = state.offset
        text = state.push(out)
        state.offset += len(text)
        lp = out.logprobs if self.want_logprobs and out.logprobs else None
        if not (text or lp or out.finished):
            return events
        finish = wire_finish(out.finish_reason)
        if job.endpoint is Endpoint.CHAT:
            delta = Delta(content=text) if text or not out.finished else Delta()
            events.append(self._chat_chunk(ChatChunkChoice(
                index=out.index, delta=delta, logprobs=chat_logprobs(lp) if lp else None, finish_reason=finish,
                model=self._model_field(out.index))))
        else:
            events.append(self._completion_chunk(CompletionChoice(
                index=out.index, text=text, logprobs=completion_logprobs(lp, start_offset) if lp else None,
                finish_reason=finish, model=self._model_field(out.index))))
        return events

    def usage_chunk(self) -> str:
        if self.job.endpoint is Endpoint.CHAT:
            return self._dump(self._chunk_base(ChatCompletionChunk, [], self.usage()))
        return self._dump(self._chunk_base(CompletionResponse, [], self.usage()))

    def _chunk_base(self, cls, choices, usage=None):
        j = self.job
        return cls(id=j.response_id, created=j.created, model=j.model, system_fingerprint=j.fingerprint,
                   choices=choices, usage=usage)

    def _chat_chunk(self, choice: ChatChunkChoice) -> str:
        return self._dump(self._chunk_base(ChatCompletionChunk, [choice]))

    def _completion_chunk(self, choice: CompletionChoice) -> str:
        return self._dump(self._chunk_base(CompletionResponse, [choice]))

    # ---- one response -------------------------------------------------------------------------
    def response(self) -> str:
        self.check_complete()
        if self.job.endpoint is Endpoint.CHAT:
            choices = [ChatChoice(index=s.index, message=AssistantMessage(content="".join(s.parts)),
                                  logprobs=chat_logprobs(s.logprobs) if self.want_logprobs else None,
                                  finish_reason=wire_finish(s.finish), model=self._model_field(s.index))
                       for s in self.states]
            body = self._chunk_base(ChatCompletionResponse, choices, self.usage())
        else:
            choices = [CompletionChoice(index=s.index, text="".join(s.parts),
                                        logprobs=completion_logprobs(s.logprobs, 0) if self.want_logprobs else None,
                                        finish_reason=wire_finish(s.finish), model=self._model_field(s.index))
                       for s in self.states]
            body = self._chunk_base(CompletionResponse, choices, self.usage())
        return body.model_dump_json()
