// The chat page: a conversation kept in this tab, sent to /v1/chat/completions with stream: true.
// The SSE reader keeps a line buffer across network reads (an event split between two reads is
// joined, never dropped); Stop aborts the fetch, which closes the connection and frees the
// server's slot; every server error (400, 401, 413, 503, or an error event mid-stream) is shown.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], busy: false, controller: null };
const SETTINGS = ["temperature", "top-k", "max-tokens", "api-key"];

// ---------------------------------------------------------------------------------------------
// settings (kept in localStorage)

function loadSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem("picochat." + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => localStorage.setItem("picochat." + id, $(id).value));
  }
}

function numberSetting(id, fallback) {
  const v = Number($(id).value);
  return $(id).value.trim() === "" || !Number.isFinite(v) ? fallback : v;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// ---------------------------------------------------------------------------------------------
// errors

function showError(text) {
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

async function errorText(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body && body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    detail = response.statusText;
  }
  const retry = response.headers.get("Retry-After");
  const hint = response.status === 503 && retry ? ` (retry in ${retry} s)` : "";
  return `Server error ${response.status}: ${detail}${hint}`;
}

// ---------------------------------------------------------------------------------------------
// rendering

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, title, onClick) {
  const b = el("button", "small", label);
  b.type = "button";
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function renderAll() {
  const box = $("messages");
  box.replaceChildren();
  if (!state.messages.length) box.append($("empty-template").content.cloneNode(true));
  state.messages.forEach((msg, index) => box.append(renderMessage(msg, index)));
  box.scrollTop = box.scrollHeight;
}

function renderMessage(msg, index) {
  const wrap = el("div", "msg " + msg.role);
  wrap.dataset.index = index;
  const body = el("div", "body");
  if (msg.role === "assistant") Markdown.renderReply(msg.content, body);
  else body.textContent = msg.content;
  wrap.append(body);
  const meta = el("div", "meta");
  if (msg.stats) meta.append(el("span", "stats", msg.stats));
  if (msg.note) meta.append(el("span", "note", msg.note));
  const last = index === state.messages.length - 1;
  if (!state.busy && msg.role === "user") meta.append(button("Edit", "edit this message and answer again", () => startEdit(index)));
  if (!state.busy && last && msg.role === "assistant") meta.append(button("Regenerate", "answer again", regenerate));
  if (!state.busy && last && msg.role === "user") meta.append(button("Retry", "send again", () => generate()));
  wrap.append(meta);
  return wrap;
}

function updateStreaming(msg) {
  const wrap = $("messages").lastElementChild;
  if (!wrap || wrap.dataset.index !== String(state.messages.length - 1)) return renderAll();
  const body = el("div", "body");
  Markdown.renderReply(msg.content, body);
  wrap.querySelector(".body").replaceWith(body);
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function startEdit(index) {
  const wrap = $("messages").querySelector(`[data-index="${index}"]`);
  const area = el("textarea", "edit");
  area.value = state.messages[index].content;
  const save = button("Save & send", "replace this message and answer it", () => {
    const text = area.value.trim();
    if (!text) return;
    state.messages = state.messages.slice(0, index);
    state.messages.push({ role: "user", content: text });
    generate();
  });
  const cancel = button("Cancel", "keep the message", renderAll);
  wrap.replaceChildren(area, el("div", "meta"));
  wrap.lastChild.append(save, cancel);
  area.focus();
}

function setBusy(busy) {
  state.busy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// ---------------------------------------------------------------------------------------------
// streaming

// Yields the data of each server-sent event. Network reads can end anywhere (mid-line, even
// mid-character): text is decoded in streaming mode and only complete events are handed out.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const flush = function* (final) {
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = final ? "" : blocks.pop();
    for (const block of blocks) {
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    yield* flush(false);
  }
  buffer += decoder.decode();
  yield* flush(true);
}

function requestBody() {
  const topK = numberSetting("top-k", 0);
  return {
    messages: state.messages.map((m) => ({ role: m.role, content: m.content })),
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberSetting("temperature", 0.8),
    top_k: topK > 0 ? Math.round(topK) : null,
    max_tokens: Math.max(1, Math.round(numberSetting("max-tokens", 256))),
  };
}

async function generate() {
  if (state.busy) return;
  clearError();
  const reply = { role: "assistant", content: "", stats: "" };
  const body = requestBody();
  state.controller = new AbortController();
  setBusy(true);
  state.messages.push(reply);
  renderAll();
  const started = performance.now();
  let first = null, usage = null, finish = null, pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; updateStreaming(reply); });
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new Error("Server error: " + event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        if (choice.delta && choice.delta.content) {
          if (first === null) first = performance.now();
          reply.content += choice.delta.content;
          redraw();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    reply.stats = stats(usage, started, first);
    if (finish === "length") reply.note = "(cut at the token limit)";
  } catch (e) {
    if (e.name === "AbortError") {
      reply.note = "(stopped)";
    } else {
      state.messages.pop(); // the reply never came: keep the question so it can be retried
      showError(e.message === "Failed to fetch" ? "Could not reach the server." : e.message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
    renderAll();
  }
}

function stats(usage, started, first) {
  if (!usage || first === null) return "";
  const seconds = (performance.now() - first) / 1000;
  const n = usage.completion_tokens;
  const rate = n > 1 && seconds > 0 ? `${((n - 1) / seconds).toFixed(1)} tok/s` : "";
  const ttft = `first token ${Math.round(first - started)} ms`;
  return [`${n} tokens`, rate, ttft].filter(Boolean).join(" · ");
}

function stop() {
  if (state.controller) state.controller.abort();
}

function regenerate() {
  if (state.busy) return;
  if (state.messages.length && state.messages[state.messages.length - 1].role === "assistant") state.messages.pop();
  generate();
}

function send(event) {
  if (event) event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.busy) return;
  $("input").value = "";
  state.messages.push({ role: "user", content: text });
  generate();
}

async function showModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) return;
    const body = await r.json();
    if (body.data && body.data.length) $("model").textContent = body.data[0].id;
  } catch (e) { /* the page still works; errors show when a message is sent */ }
}

// ---------------------------------------------------------------------------------------------

function init() {
  const template = document.createElement("template");
  template.id = "empty-template";
  template.content.append($("empty"));
  document.body.append(template);
  loadSettings();
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    stop();
    state.messages = [];
    clearError();
    renderAll();
    $("input").focus();
  });
  $("toggle-settings").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("toggle-settings").setAttribute("aria-expanded", String(open));
  });
  $("error-close").addEventListener("click", clearError);
  renderAll();
  showModel();
  $("input").focus();
}

init();
