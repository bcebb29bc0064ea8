"""Request → prompt ids: chat messages become (query, history) the way THUDM's openai_api.py pairs them,
then the one ChatGLM2 template plus the adapter's training recipe (source_prefix, max_source_length)."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from chatglm.tokenizer import build_chat_prompt

from .errors import InvalidRequest
from .protocol import ChatMessage, PromptInput, Role

log = logging.getLogger(__name__)

History = list[tuple[str, str]]


class PromptTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def __call__(self, texts: str, max_length: int | None = None, truncation: bool = False) -> dict: ...


def message_text(message: ChatMessage, where: str) -> str:
    """Flatten `content` (a string or text parts) to one string; other part types are a 400."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(f"{where}.content[{j}] has type {part.type!r}; only text parts are supported",
                                 f"{where}.content[{j}].type")
        texts.append(part.text)
    return "\n".join(texts)


def split_messages(messages: Sequence[ChatMessage]) -> tuple[str, History]:
    """THUDM openai_api: the last message is the user's query; a leading system message is glued onto
    the front of that query with no separator; the rest pair up as (user, assistant) history rounds.
    Where THUDM silently drops history that does not pair up, we answer 400 and say what is wrong."""
    system = ""
    rest = list(enumerate(messages))
    if rest and rest[0][1].role in (Role.SYSTEM, Role.DEVELOPER):
        system = message_text(rest[0][1], "messages[0]")
        rest = rest[1:]
    for i, m in rest:
        where = f"messages[{i}]"
        if m.role in (Role.SYSTEM, Role.DEVELOPER):
            raise InvalidRequest(f"{where}: a {m.role.value} message is only supported as the first message",
                                 f"{where}.role")
        if m.role in (Role.TOOL, Role.FUNCTION) or m.tool_calls or m.function_call:
            raise InvalidRequest(f"{where}: tool and function messages are not supported by this server",
                                 f"{where}.role")
    if not rest:
        raise InvalidRequest("messages must contain a user message (after the optional system message)", "messages")
    last_index, last = rest[-1]
    if last.role != Role.USER:
        raise InvalidRequest(f"messages[{last_index}]: the last message must have role 'user', got "
                             f"'{last.role.value}'", f"messages[{last_index}].role")
    history: History = []
    for k, (i, m) in enumerate(rest):
        expected = Role.USER if k % 2 == 0 else Role.ASSISTANT
        if m.role != expected:
            raise InvalidRequest(f"messages[{i}]: expected role '{expected.value}' here (after the system message, "
                                 f"messages alternate user, assistant, ..., user), got '{m.role.value}'",
                                 f"messages[{i}].role")
        if i == last_index:
            break
        if expected == Role.USER:
            history.append((_nonempty(m, i), ""))
        else:
            history[-1] = (history[-1][0], message_text(m, f"messages[{i}]"))
    query = _nonempty(last, last_index)
    return system + query, history


def _nonempty(message: ChatMessage, i: int) -> str:
    text = message_text(message, f"messages[{i}]")
    if not text.strip():
        raise InvalidRequest(f"messages[{i}].content is empty", f"messages[{i}].content")
    return text


def chat_prompt_ids(tokenizer: PromptTokenizer, query: str, history: History,
                    manifest: Mapping[str, Any] | None = None) -> list[int]:
    """THUDM ptuning preprocessing: source_prefix + build_prompt(query, history), encoded with
    [gMASK] sop and truncated on the right to max_source_length tokens (the two specials count)."""
    manifest = manifest or {}
    prefix = manifest.get("source_prefix") or ""
    prompt = str(prefix) + build_chat_prompt(query, history)
    ids = tokenizer.encode(prompt)
    limit = manifest.get("max_source_length")
    if isinstance(limit, int) and 0 < limit < len(ids):
        log.info("prompt of %d tokens truncated to max_source_length=%d (adapter training recipe)", len(ids), limit)
        ids = list(tokenizer(prompt, max_length=limit, truncation=True)["input_ids"])
    return ids


def completion_prompt_ids(tokenizer: PromptTokenizer, prompt: PromptInput) -> list[list[int]]:
    """/v1/completions prompts: text gets [gMASK] sop in front (as tokenizer(text) does); id lists
    are used as given, after a range check."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise InvalidRequest("prompt must not be an empty list", "prompt")
    if isinstance(prompt[0], str):
        return [tokenizer.encode(p) for p in prompt]  # type: ignore[arg-type]
    batches = [prompt] if isinstance(prompt[0], int) else prompt
    for j, ids in enumerate(batches):  # type: ignore[assignment]
        if not ids:
            raise InvalidRequest(f"prompt[{j}] is an empty token list", "prompt")
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                                 "prompt")
    return [list(ids) for ids in batches]  # type: ignore[arg-type]
