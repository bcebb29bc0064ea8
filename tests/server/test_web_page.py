"""The chat page at / in headless Chromium against a real `python -m server` on the chatglm2-tiny fixture (base +
the pre8 P-Tuning v2 checkpoint, API key on): the key gate and its localStorage, the model list, answers that stream
in for the base and the adapter (equal to the API's own greedy answers), history and usage, the stop button (the
server sees the client go), and an OpenAI error shown on the page."""
import re
import time

import httpx
import pytest

from tests.live_server import live_server
from tests.server.browser import require_browser, start_chrome

KEY = "sk-web-page"
BASE, ADAPTER = "chatglm2-tiny", "pre8"


@pytest.fixture(scope="module")
def server(fixture_dir, tmp_path_factory):
    require_browser()  # skip (or fail under CI) before paying for a model load
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    args = ["--model", str(fixture_dir / "model"), "--model-name", BASE, "--adapter",
            f"{ADAPTER}={fixture_dir / 'ptuning-pre8'}", "--checkpoints", str(checkpoints), "--api-key", KEY,
            "--torch-threads", "1", "--drain-timeout", "5"]
    with live_server(args, tmp_path_factory.mktemp("log") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from selenium.webdriver.support.ui import WebDriverWait

    chrome = start_chrome(tmp_path_factory.mktemp("profile"))
    chrome.wait = lambda cond, timeout=60, what="": WebDriverWait(chrome, timeout, poll_frequency=0.05).until(
        cond, f"waited {timeout} s for {what or cond}; last answer: {last_answer(chrome)}")
    chrome.js = chrome.execute_script
    yield chrome
    chrome.quit()


def api(server, **body):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def set_value(page, element_id, value):
    page.js("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));", element_id, str(value))


def last_answer(page):
    return page.js("""const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m && {state: m.dataset.state, text: m.querySelector('.content').textContent,
                     meta: m.querySelector('.meta').textContent, who: m.querySelector('.who').textContent,
                     prompt: Number(m.dataset.promptTokens), completion: Number(m.dataset.completionTokens)};""")


def open_page(page, server):
    """The page with the key already in localStorage and the model list loaded (tests run alone too)."""
    page.get(server.url + "/")
    page.js("localStorage.setItem('chatglm.apiKey', arguments[0])", KEY)
    page.refresh()
    page.wait(lambda p: p.js("return document.getElementById('model').options.length") == 2, what="the model list")
    page.find_element("id", "new-chat").click()
    set_value(page, "model", BASE)


def answers(page):
    return page.js("return document.querySelectorAll('.msg.assistant').length")


def send(page, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = answers(page)
    box = page.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)  # Enter sends (Shift+Enter would add a line)
    page.wait(lambda p: answers(p) == before + 1, what="a new answer bubble")


def finished(page, timeout=120):
    page.wait(lambda p: last_answer(p)["state"] != "streaming", timeout, "the answer to finish")
    return last_answer(page)


def test_page_asks_for_the_key_then_lists_models_and_remembers_it(server, page):
    page.get(server.url + "/")
    page.js("localStorage.clear()")
    page.refresh()
    assert page.title == "ChatGLM2 chat"
    page.wait(lambda p: p.find_element("id", "error").is_displayed())
    error = page.find_element("id", "error-text").text
    assert "HTTP 401" in error and "invalid_api_key" in error, error
    set_value(page, "api-key", KEY)
    page.wait(lambda p: len(p.js("return document.getElementById('model').options")) == 2)
    options = page.js("return [...document.getElementById('model').options].map(o => [o.value, o.text])")
    assert options == [[BASE, f"{BASE} — base model"], [ADAPTER, f"{ADAPTER} — adapter (prefix 8)"]]
    assert not page.find_element("id", "error").is_displayed()
    assert page.js("return localStorage.getItem('chatglm.apiKey')") == KEY

    page.refresh()  # the key comes back from localStorage: models load with no typing
    page.wait(lambda p: p.js("return document.getElementById('model').value") == BASE)
    assert page.find_element("id", "api-key").get_attribute("value") == KEY


def test_streamed_answers_for_base_and_adapter_with_history_and_usage(server, page):
    open_page(page, server)
    set_value(page, "temperature", 0)  # greedy: the page must show exactly what the API answers
    set_value(page, "max_tokens", 24)

    question = "类型#上衣*材质#牛仔布"
    send(page, question)
    base = finished(page)
    want = api(server, model=BASE, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24)
    assert base["state"] == "done" and base["who"] == BASE
    assert base["text"] == want["choices"][0]["message"]["content"] and base["text"]
    assert (base["prompt"], base["completion"]) == (want["usage"]["prompt_tokens"],
                                                     want["usage"]["completion_tokens"])
    assert re.search(r"\d+ prompt \+ \d+ completion = \d+ tokens", base["meta"]), base["meta"]

    set_value(page, "model", ADAPTER)
    follow_up = "再写一句"
    send(page, follow_up)
    adapted = finished(page)
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": base["text"]},
               {"role": "user", "content": follow_up}]
    want = api(server, model=ADAPTER, messages=history, temperature=0, max_tokens=24)
    assert adapted["state"] == "done" and adapted["who"] == ADAPTER
    assert adapted["text"] == want["choices"][0]["message"]["content"] and adapted["text"]
    assert adapted["prompt"] == want["usage"]["prompt_tokens"] > base["prompt"] + base["completion"]  # history sent
    totals = page.find_element("id", "totals").text
    assert f"{base['prompt'] + adapted['prompt']} prompt" in totals, totals


def client_gone(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(v) for v in re.findall(r'^chatglm_requests_total\{[^}]*outcome="client_gone"[^}]*\} (\S+)$',
                                            text, re.M))


def test_tokens_arrive_while_streaming_and_stop_aborts(server, page):
    open_page(page, server)
    set_value(page, "model", ADAPTER)
    set_value(page, "temperature", 0)  # greedy: this prompt runs to max_tokens on both fixture models
    set_value(page, "max_tokens", 1500)  # far more than arrives before the click (tens of seconds)
    gone_before = client_gone(server)

    send(page, "写一段很长的广告")
    page.wait(lambda p: last_answer(p)["text"] or last_answer(p)["state"] != "streaming", what="the first tokens")
    partial = last_answer(page)
    assert partial["state"] == "streaming", "the answer must show while the request is still running"
    assert page.find_element("id", "send").get_attribute("disabled") is not None
    page.find_element("id", "stop").click()

    stopped = finished(page, timeout=10)
    assert stopped["state"] == "stopped" and stopped["meta"].startswith("Stopped after")
    assert stopped["text"].startswith(partial["text"])
    time.sleep(1.0)
    assert last_answer(page)["text"] == stopped["text"], "text kept growing after Stop"
    assert page.find_element("id", "send").get_attribute("disabled") is None
    assert page.find_element("id", "stop").get_attribute("disabled") is not None
    deadline = time.monotonic() + 30  # the server saw the connection close and aborted the request
    while client_gone(server) <= gone_before:
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.2)


def test_openai_error_is_shown_and_the_message_given_back(server, page):
    open_page(page, server)
    set_value(page, "max_tokens", 30000)  # beyond the fixture's 2048-token context
    send(page, "你好")
    failed = finished(page)
    assert failed["state"] == "error"
    error = page.find_element("id", "error-text").text
    assert page.find_element("id", "error").is_displayed() and "HTTP 400" in error, error
    assert "context" in error.lower() or "max_tokens" in error, error
    assert page.find_element("id", "prompt").get_attribute("value") == "你好"
