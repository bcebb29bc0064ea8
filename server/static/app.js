// Chat page for the OpenAI-compatible server: plain JS, no build step, only the public API
// (GET /v1/models, POST /v1/chat/completions with stream: true, parsed from the SSE byte stream).
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["temperature", "top_p", "max_tokens"];
const state = { history: [], controller: null, totals: { prompt: 0, completion: 0 }, retry: null };

const store = {
  get(key, fallback) {
    try { const v = localStorage.getItem("chatglm." + key); return v === null ? fallback : v; } catch { return fallback; }
  },
  set(key, value) {
    try { value ? localStorage.setItem("chatglm." + key, value) : localStorage.removeItem("chatglm." + key); } catch { /* private mode */ }
  },
};

class ApiError extends Error {
  constructor(message, { status = null, type = null, code = null, param = null } = {}) {
    super(message);
    Object.assign(this, { status, type, code, param });
  }
}

function requestHeaders(json) {
  const headers = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

// An OpenAI error body ({"error": {message, type, code, param}}) or, failing that, the HTTP status.
async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const e = body && body.error;
  if (e && e.message) return new ApiError(e.message, { ...e, status: response.status });
  return new ApiError(`HTTP ${response.status} ${response.statusText}`.trim(), { status: response.status });
}

function showError(err) {
  const parts = [err.message || String(err)];
  const detail = [err.status && `HTTP ${err.status}`, err.code || err.type].filter(Boolean).join(" · ");
  if (detail) parts.push(`(${detail})`);
  $("error-text").textContent = parts.join(" ");
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// Server-sent events from a fetch body: yields each event's data ("data:" lines joined by \n).
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } // comments (":" pings) and other fields are ignored
      }
      if (done) break;
    }
    if (buffer.startsWith("data:")) data.push(buffer.slice(buffer.startsWith("data: ") ? 6 : 5));
    if (data.length) yield data.join("\n");
  } finally {
    reader.releaseLock();
  }
}

// ---- models ----

async function loadModels() {
  clearTimeout(state.retry);
  const select = $("model");
  let response;
  try {
    response = await fetch("/v1/models", { headers: requestHeaders(false) });
  } catch (err) {
    showError(new ApiError(`Cannot reach the server: ${err.message}`));
    return;
  }
  if (!response.ok) {
    const err = await errorFrom(response);
    if (err.code === "engine_not_ready") {  // still loading: say so and try again shortly
      select.replaceChildren(new Option("Model loading…", ""));
      state.retry = setTimeout(loadModels, 2000);
    } else if (err.status === 401) {
      select.replaceChildren(new Option("API key needed", ""));
      $("api-key").focus();
    }
    showError(err);
    return;
  }
  const { data } = await response.json();
  const wanted = select.value || store.get("model", "");
  select.replaceChildren(...data.map((m) => {
    const label = m.kind === "adapter" ? `${m.id} — adapter (prefix ${m.pre_seq_len})` : `${m.id} — base model`;
    const option = new Option(m.state === "failed" ? `${label}: unavailable` : label, m.id);
    option.disabled = m.state === "failed";
    option.dataset.kind = m.kind;
    option.dataset.maxLen = m.max_model_len || "";
    if (m.error) option.title = m.error;
    return option;
  }));
  const usable = data.filter((m) => m.state !== "failed").map((m) => m.id);
  select.value = usable.includes(wanted) ? wanted : usable[0] || "";
  hideError();
  describeModel();
}

function describeModel() {
  const option = $("model").selectedOptions[0];
  $("model-info").textContent = option && option.value && option.dataset.maxLen
    ? `context ${option.dataset.maxLen} tokens` : "";
  if (option && option.value) store.set("model", option.value);
}

// ---- conversation ----

function addMessage(role, text, model) {
  $("empty").hidden = true;
  const article = document.createElement("article");
  article.className = `msg ${role}`;
  const who = document.createElement("h3");
  who.className = "who";
  who.textContent = role === "user" ? "You" : model;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  article.append(who, content);
  if (role === "assistant") {
    const meta = document.createElement("p");
    meta.className = "meta";
    article.append(meta);
  }
  const log = $("log");
  log.append(article);
  log.scrollTop = log.scrollHeight;
  return article;
}

// Apply a change to the log, keeping it scrolled to the end if the reader was there (not if they scrolled up).
function followLog(change) {
  const log = $("log");
  const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  change();
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("composer").setAttribute("aria-busy", String(busy));
}

function showUsage(article, usage, finish, seconds) {
  const meta = article.querySelector(".meta");
  const bits = [];
  if (usage) {
    article.dataset.promptTokens = usage.prompt_tokens;
    article.dataset.completionTokens = usage.completion_tokens;
    bits.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens`);
    if (seconds > 0) bits.push(`${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
    state.totals.prompt += usage.prompt_tokens;
    state.totals.completion += usage.completion_tokens;
    $("totals").textContent = `This chat: ${state.totals.prompt} prompt + ${state.totals.completion} completion tokens`;
  }
  if (finish) bits.push(finish === "length" ? "stopped at max tokens" : `finish: ${finish}`);
  bits.push(`${seconds.toFixed(1)} s`);
  meta.textContent = bits.join(" · ");
}

async function send(text) {
  const model = $("model").value;
  if (!model) { showError(new ApiError("Pick a model first (the list comes from GET /v1/models).")); return; }
  hideError();
  const messages = [...state.history, { role: "user", content: text }];
  addMessage("user", text);
  const article = addMessage("assistant", "", model);
  const content = article.querySelector(".content");
  article.dataset.state = "streaming";
  article.dataset.chunks = "0";
  article.setAttribute("aria-busy", "true");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value) || undefined,
  };
  const started = performance.now();
  let answer = "", usage = null, finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: requestHeaders(true), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw await errorFrom(response);
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message, chunk.error);
      for (const choice of chunk.choices || []) {
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          answer += delta;
          followLog(() => { content.textContent = answer; });
          article.dataset.chunks = String(Number(article.dataset.chunks) + 1);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    article.dataset.state = "done";
    followLog(() => showUsage(article, usage, finish, (performance.now() - started) / 1000));
  } catch (err) {
    if (err.name === "AbortError") {
      article.dataset.state = "stopped";
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      followLog(() => { article.querySelector(".meta").textContent = `Stopped after ${seconds} s`; });
    } else {
      article.dataset.state = "error";
      followLog(() => { article.querySelector(".meta").textContent = "Failed: " + err.message; });
      showError(err);
    }
  } finally {
    article.setAttribute("aria-busy", "false");
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
  }
  if (answer) {  // a stopped answer stays in the history as far as it got
    state.history = [...messages, { role: "assistant", content: answer }];
  } else if (article.dataset.state === "error" && !$("prompt").value) {
    $("prompt").value = text;  // nothing came back: give the message back to edit and resend
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.totals = { prompt: 0, completion: 0 };
  $("totals").textContent = "";
  $("log").querySelectorAll(".msg").forEach((m) => m.remove());
  $("empty").hidden = false;
  hideError();
  $("prompt").focus();
}

// ---- wiring ----

function init() {
  for (const id of SETTINGS) {
    const input = $(id);
    input.value = store.get(id, input.value);
    const out = $(`${id}-out`);
    const update = () => { if (out) out.textContent = input.value; store.set(id, input.value); };
    input.addEventListener("input", update);
    update();
  }
  $("api-key").value = store.get("apiKey", "");
  $("api-key").addEventListener("change", () => { store.set("apiKey", $("api-key").value.trim()); loadModels(); });
  $("model").addEventListener("change", describeModel);
  $("reload-models").addEventListener("click", loadModels);
  $("new-chat").addEventListener("click", newChat);
  $("error-close").addEventListener("click", hideError);
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {  // IME composition keeps Enter
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  loadModels();
}

init();
