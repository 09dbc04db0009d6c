// The chat page of `jpaged serve`: plain browser JavaScript, no build step, nothing fetched from
// outside. It talks to the server's own API: GET /ui/capabilities (what to offer), a streamed
// POST /v1/chat/completions per answer, GET /metrics every second for the live panel.
// NOTE: text from the model (and from the user) enters the page through textContent only, never
// innerHTML: a completion is text, whatever markup it contains.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "jpaged.apiKey";     // sessionStorage: asked once per tab, gone when it closes
const METRICS_PERIOD_MS = 1000;

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  history: [],            // the conversation sent with each request: [{role, content}]
  controller: null,       // AbortController of the answer streaming now
  keyPrompt: null,        // the pending key dialog, shared by every call that met a 401
  lastTokens: null,       // [generation_tokens_total, time] of the previous metrics poll
};

// ---- the API, with the key ------------------------------------------------------------------------
function requestHeaders(json) {
  const headers = {};
  if (json) headers["Content-Type"] = "application/json";
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  return headers;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

/** fetch() with the API key; a 401 opens the key dialog and the call is tried again. */
async function api(path, options = {}) {
  for (;;) {
    const response = await fetch(path, {...options, headers: requestHeaders("body" in options)});
    if (response.status !== 401) return response;
    await askKey(await errorMessage(response));
  }
}

function askKey(message) {
  if (!state.keyPrompt) {
    state.keyPrompt = new Promise((resolve) => {
      $("key-error").textContent = state.key ? message : "";
      $("api-key").value = "";
      $("key-dialog").hidden = false;
      $("api-key").focus();
      $("key-form").onsubmit = (event) => {
        event.preventDefault();
        state.key = $("api-key").value.trim();
        sessionStorage.setItem(KEY_STORAGE, state.key);
        $("key-dialog").hidden = true;
        state.keyPrompt = null;
        resolve();
      };
    });
  }
  return state.keyPrompt;
}

/** The JSON objects of a server-sent event stream, up to `data: [DONE]`. */
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trim()).join("\n");
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---- what the server offers -------------------------------------------------------------------------
function option(select, value, label) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = label;
  select.append(el);
}

/** Fill the controls from GET /ui/capabilities: models always; the adapter choice and the JSON
 * schema box only when the server has LoRA adapters or structured outputs. */
function showCapabilities(caps) {
  const model = $("model");
  model.replaceChildren();
  for (const card of caps.models) option(model, card.id, card.id);
  const adapters = caps.lora_adapters || [];
  for (const adapter of adapters) option($("adapter"), adapter.id, adapter.id);
  $("adapter-field").hidden = adapters.length === 0;
  $("schema-field").hidden = !caps.structured_outputs;
  const context = caps.models[0].max_model_len;
  if (context) $("max-tokens").value = Math.min(512, Math.floor(context / 2));
  const facts = [
    ["context", `${caps.models[0].max_model_len} tokens`],
    ["LoRA adapters", adapters.length ? adapters.map((a) => a.id).join(", ") : "none"],
    ["structured outputs", caps.structured_outputs ? "yes" : "no"],
    ["tools", caps.tools ? "yes" : "no"],
  ];
  const list = document.createElement("dl");
  for (const [name, value] of facts) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = value;
    list.append(dt, dd);
  }
  $("server-info").replaceChildren(list);
}

// ---- the live panel ---------------------------------------------------------------------------------
function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    const match = /^(jpaged:[A-Za-z0-9_:]+)(?:\{[^}]*\})? (\S+)$/.exec(line);
    if (match) values[match[1]] = Number(match[2]);
  }
  return values;
}

async function pollMetrics() {
  const response = await api("/metrics");
  if (!response.ok) throw new Error(await errorMessage(response));
  const m = parseMetrics(await response.text());
  const now = performance.now();
  $("m-running").textContent = m["jpaged:num_requests_running"];
  $("m-waiting").textContent = m["jpaged:num_requests_waiting"];
  $("m-pages").textContent = `${m["jpaged:kv_pages_used"]} / ${m["jpaged:kv_pages_total"]}`;
  const tokens = m["jpaged:generation_tokens_total"];
  if (state.lastTokens) {
    const [before, then] = state.lastTokens;
    $("m-tps").textContent = ((tokens - before) / ((now - then) / 1000)).toFixed(1);
  }
  state.lastTokens = [tokens, now];
}

async function metricsLoop() {
  for (;;) {
    try {
      await pollMetrics();
    } catch (err) {
      $("m-tps").textContent = "–";
    }
    await new Promise((resolve) => setTimeout(resolve, METRICS_PERIOD_MS));
  }
}

// ---- the conversation -------------------------------------------------------------------------------
function addMessage(role, text) {
  const root = document.createElement("div");
  root.className = `msg ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  root.append(label, content, meta);
  $("log").append(root);
  root.scrollIntoView({block: "end"});
  return {root, content, meta};
}

function numberField(id, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${id}: ${JSON.stringify(raw)} is not ${integer ? "an integer" : "a number"}`);
  }
  return value;
}

/** The chat completion request for the conversation so far, from the controls. */
function buildRequest() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...state.history);
  const body = {
    model: $("adapter").value || $("model").value, messages,
    stream: true, stream_options: {include_usage: true},
    temperature: numberField("temperature", false), top_p: numberField("top-p", false),
    max_tokens: numberField("max-tokens", true), seed: numberField("seed", true),
  };
  const stop = $("stop-strings").value.split("\n").filter((line) => line !== "");
  if (stop.length) body.stop = stop;
  const schema = $("json-schema").value.trim();
  if (!$("schema-field").hidden && schema) {
    try {
      body.response_format = {type: "json_schema",
                              json_schema: {name: "answer", schema: JSON.parse(schema)}};
    } catch (err) {
      throw new Error(`JSON schema: ${err.message}`);
    }
  }
  return body;
}

/** "stop · 42 tokens · first token 0.21 s · 31.5 tokens/s" (the rate after the first token). */
function summary(finish, usage, start, firstAt) {
  const parts = [finish || "done"];
  const tokens = usage ? usage.completion_tokens : null;
  if (tokens !== null) parts.push(`${tokens} tokens`);
  if (firstAt !== null) {
    parts.push(`first token ${((firstAt - start) / 1000).toFixed(2)} s`);
    const seconds = (performance.now() - firstAt) / 1000;
    if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
  }
  return parts.join(" · ");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  const history = state.history;     // "New chat" while streaming starts a fresh one
  let body;
  history.push({role: "user", content: text});
  try {
    body = buildRequest();
  } catch (err) {
    history.pop();
    $("status").textContent = err.message;
    return;
  }
  $("status").textContent = "";
  addMessage("user", text);
  const view = addMessage("assistant", "");
  view.root.classList.add("streaming");
  const controller = state.controller = new AbortController();
  setBusy(true);
  const start = performance.now();
  let answer = "", usage = null, finish = null, firstAt = null;
  try {
    const response = await api("/v1/chat/completions", {method: "POST",
      body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of sseEvents(response.body)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        if (choice.delta && choice.delta.content) {
          if (firstAt === null) firstAt = performance.now();
          answer += choice.delta.content;
          view.content.textContent = answer;
          view.root.scrollIntoView({block: "end"});
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    view.meta.textContent = summary(finish, usage, start, firstAt);
  } catch (err) {
    if (err.name === "AbortError") {
      view.meta.textContent = "stopped";
    } else {
      view.root.classList.add("error");
      view.meta.textContent = err.message;
    }
  } finally {
    view.root.classList.remove("streaming");
    if (state.controller === controller) state.controller = null;
    setBusy(false);
  }
  if (answer) history.push({role: "assistant", content: answer});
  else history.pop();       // nothing came back: the question is not part of the chat
}

function start() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("log").replaceChildren();
  });
  api("/ui/capabilities")
    .then(async (response) => {
      if (!response.ok) throw new Error(await errorMessage(response));
      showCapabilities(await response.json());
    })
    .catch((err) => { $("status").textContent = `could not read the server's capabilities: ${err.message}`; })
    .then(metricsLoop);
}

start();
