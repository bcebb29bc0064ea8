"""OpenAI request schemas → SamplingParams, unsupported fields, and messages → (query, history) → ids."""
import pytest
from pydantic import ValidationError

from chatglm.tokenizer import build_chat_prompt
from server.chat_prompt import chat_prompt_ids, completion_prompt_ids, split_messages
from server.errors import InvalidRequest
from server.http_errors import from_validation_error
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.sampling import THUDM_DEFAULTS
from server.streaming import ResponseTrimmer
from tests.server.fake_engine import FakeTokenizer


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def test_chat_defaults_follow_thudm_chat():
    p = chat().to_sampling_params()
    assert (p.temperature, p.top_p, p.top_k) == (THUDM_DEFAULTS["temperature"], THUDM_DEFAULTS["top_p"],
                                                THUDM_DEFAULTS["top_k"])
    assert p.max_tokens is None and p.n == 1 and p.logprobs is None and p.stop == []


def test_completion_defaults_follow_openai():
    p = CompletionRequest.model_validate({"model": "m", "prompt": "x"}).to_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 1.0, 0, 16)


def test_every_sampling_field_is_mapped():
    p = chat(temperature=0, top_p=0.5, max_tokens=7, stop="##", seed=42, n=3, presence_penalty=0.5,
             frequency_penalty=-0.5, logprobs=True, top_logprobs=4, top_k=-1, repetition_penalty=1.2, min_tokens=2,
             ignore_eos=True, stop_token_ids=[2, 5], include_stop_str_in_output=True).to_sampling_params()
    assert p.greedy and p.temperature == 0.0
    assert (p.top_p, p.max_tokens, p.stop, p.seed, p.n) == (0.5, 7, ["##"], 42, 3)
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs, p.top_k) == (0.5, -0.5, 4, 0)
    assert (p.repetition_penalty, p.min_tokens, p.ignore_eos, p.stop_token_ids) == (1.2, 2, True, [2, 5])
    assert p.include_stop_str_in_output


def test_max_completion_tokens_wins_and_stop_list():
    p = chat(max_tokens=5, max_completion_tokens=9, stop=["a", "bc"]).to_sampling_params()
    assert p.max_tokens == 9 and p.stop == ["a", "bc"]
    assert chat(logprobs=True).to_sampling_params().logprobs == 0
    c = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 3, "max_tokens": 2})
    assert c.to_sampling_params().logprobs == 3 and c.to_sampling_params().max_tokens == 2


@pytest.mark.parametrize("field,value", [("temperature", 3), ("top_p", 2), ("top_p", 0), ("n", 0), ("max_tokens", 0),
                                         ("presence_penalty", 3), ("top_logprobs", 21), ("seed", 2**64),
                                         ("temperature", "hot"), ("stop", 5)])
def test_out_of_range_values_name_the_param(field, value):
    with pytest.raises(ValidationError) as e:
        chat(**{field: value})
    err = from_validation_error(e.value)
    assert err.param == field and field in err.message


def test_empty_messages_and_bad_role_name_the_param():
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    assert from_validation_error(e.value).param == "messages"
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "robot", "content": "x"}]})
    assert from_validation_error(e.value).param == "messages[0].role"
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    err = from_validation_error(e.value)
    assert err.param == "model" and "Missing required parameter" in err.message


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"min_p": 0.1}, "min_p"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
])
def test_unsupported_fields_are_reported(extra, param):
    assert [p for p, _ in chat(**extra).unsupported()] == [param]


def test_harmless_fields_are_accepted_and_unknown_ones_listed():
    r = chat(tools=[], tool_choice="none", response_format={"type": "text"}, user="u", metadata={"a": "b"},
             store=False, service_tier="auto", my_vendor_flag=1)
    assert r.unsupported() == []
    assert r.ignored_fields() == ["metadata", "my_vendor_flag", "service_tier", "store"]


def test_completion_unsupported():
    base = {"model": "m", "prompt": "x"}
    assert [p for p, _ in CompletionRequest.model_validate({**base, "echo": True}).unsupported()] == ["echo"]
    assert [p for p, _ in CompletionRequest.model_validate({**base, "suffix": "s"}).unsupported()] == ["suffix"]
    assert [p for p, _ in CompletionRequest.model_validate({**base, "best_of": 3}).unsupported()] == ["best_of"]
    assert CompletionRequest.model_validate({**base, "best_of": 1}).unsupported() == []


def test_too_many_choices_and_min_tokens():
    with pytest.raises(InvalidRequest) as e:
        chat(n=100, models=["a", "b"]).to_sampling_params()
    assert e.value.param == "n"
    with pytest.raises(InvalidRequest) as e:
        chat(max_tokens=2, min_tokens=3).to_sampling_params()
    assert e.value.param == "min_tokens"
    with pytest.raises(InvalidRequest):
        chat(stop=["ok", ""]).to_sampling_params()


# ---- messages → (query, history), THUDM openai_api semantics --------------------------------
def msgs(*pairs):
    return chat(messages=[{"role": r, "content": c} for r, c in pairs]).messages


def test_system_is_glued_to_the_query_and_history_pairs():
    query, history = split_messages(msgs(("system", "SYS."), ("user", "q1"), ("assistant", "a1"), ("user", "q2")))
    assert query == "SYS.q2" and history == [("q1", "a1")]
    assert split_messages(msgs(("developer", "D"), ("user", "q"))) == ("Dq", [])


def test_content_parts_are_flattened():
    m = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert split_messages(m.messages) == ("a\nb", [])


@pytest.mark.parametrize("pairs,param,words", [
    ((("assistant", "x"),), "messages[0].role", "last message must have role 'user'"),
    ((("user", "q"), ("assistant", "a")), "messages[1].role", "last message"),
    ((("user", "q"), ("user", "q2")), "messages[1].role", "expected role 'assistant'"),
    ((("assistant", "a"), ("user", "q")), "messages[0].role", "expected role 'user'"),
    ((("user", "q"), ("system", "s"), ("user", "q")), "messages[1].role", "only supported as the first"),
    ((("system", "s"),), "messages", "must contain a user message"),
    ((("user", "  "),), "messages[0].content", "is empty"),
    ((("tool", "r"), ("user", "q")), "messages[0].role", "not supported"),
])
def test_bad_conversations_say_what_is_wrong(pairs, param, words):
    with pytest.raises(InvalidRequest) as e:
        split_messages(msgs(*pairs))
    assert e.value.param == param and words in e.value.message


def test_image_parts_are_refused():
    m = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(InvalidRequest) as e:
        split_messages(m.messages)
    assert e.value.param == "messages[0].content[0].type"


def test_prompt_ids_use_the_one_template_and_the_adapter_recipe():
    tok = FakeTokenizer()
    history = [("q1", "a1")]
    assert chat_prompt_ids(tok, "q2", history) == tok.encode(build_chat_prompt("q2", history))
    recipe = {"source_prefix": "Summarize: ", "max_source_length": 12}
    ids = chat_prompt_ids(tok, "q2", history, recipe)
    full = tok.encode("Summarize: " + build_chat_prompt("q2", history))
    assert len(ids) == 12 and ids == full[:12]  # right-truncated, [gMASK] sop counted
    assert chat_prompt_ids(tok, "q", [], {"source_prefix": "P"}) == tok.encode("P" + build_chat_prompt("q"))


def test_completion_prompts():
    tok = FakeTokenizer()
    assert completion_prompt_ids(tok, "ab") == [tok.encode("ab")]
    assert completion_prompt_ids(tok, ["a", "b"]) == [tok.encode("a"), tok.encode("b")]
    assert completion_prompt_ids(tok, [11, 12]) == [[11, 12]]
    assert completion_prompt_ids(tok, [[11], [12, 13]]) == [[11], [12, 13]]
    for bad in ([], [[]], [-1], [tok.vocab_size]):
        with pytest.raises(InvalidRequest) as e:
            completion_prompt_ids(tok, bad)
        assert e.value.param == "prompt"


@pytest.mark.parametrize("pieces", [
    ["  ", "\n你好", " ", "世界 ", " \n"],
    ["[[训", "练时间]]", "是", " [[", "x"],
    ["a", "[[训练", "时间]]"],
    ["\t", " "],
    ["x[[训练时间]] ", "[[训练时", ""],
])
def test_trimmer_streams_exactly_process_response(pieces):
    trimmer = ResponseTrimmer()
    out = "".join(trimmer.push(p) for p in pieces) + trimmer.flush()
    assert out == "".join(pieces).strip().replace("[[训练时间]]", "2023年")
