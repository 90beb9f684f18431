// FlexPipe chat page: streams answers from /v1/chat/completions (fetch + server-sent events) and
// shows the pipeline from /v1/flexpipe/status.  No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
// `conversation` counts "New chat"s: a send() that finishes after one belongs to a conversation that is
// gone, and must not put its turn into the new one's history.
const state = { model: null, history: [], controller: null, conversation: 0 };

// fetch rejects with a bare TypeError ("Failed to fetch") when nothing answers; say which server and what to do.
function unreachable(err) {
  if (err.name === "AbortError" || !(err instanceof TypeError)) return err;
  return new Error("Cannot reach the server at " + location.origin + ": is `flexpipe serve` running?");
}

function authHeaders() {
  const key = $("api-key").value.trim() || localStorage.getItem("flexpipe-api-key") || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

// `askKey`: on a 401, open the settings and put the cursor in the key field.  Only for what the user
// just did (send, reshape) and the page's first model load: a background poll that did it would take
// the focus away from the message being typed, every second, and Enter would save the text as the key.
async function api(path, options = {}, askKey = false) {
  const headers = { "Content-Type": "application/json", ...authHeaders(), ...(options.headers || {}) };
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw unreachable(err);
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
    if (response.status === 401 && askKey) {
      $("settings").open = true;
      $("api-key").focus();
    }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function setConn(text, kind) {
  $("conn").textContent = text;
  $("conn").className = "pill " + (kind || "");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

// Yields the JSON payload of every `data:` event of a fetch response body, up to [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// A failed turn stays on the page, marked as left out of the conversation (data-context "out"), with
// the error and a Retry button.  It is not kept like a stopped one: a stop is the user's choice about
// an answer they saw, a failure's cause often lies in the request itself (a prompt past the context,
// max tokens too large, a missing key), and kept, the turn would go with every later message and
// fail it as well.  Retry takes the failed turn off the page and sends its message again (with the
// settings as they are now), so that the page shows the conversation the model is given.
function showFailure(message, text, turn) {
  const note = addMessage("error", message);
  const why = document.createElement("span");
  why.className = "meta";
  why.textContent = "This message and its answer are not part of the conversation: the model is not given them.";
  const retry = document.createElement("button");
  retry.type = "button";
  retry.className = "retry";
  retry.textContent = "Retry";
  retry.title = "send this message again";
  retry.addEventListener("click", () => {
    if (state.controller) return;
    for (const el of [...turn, note]) el.remove();
    send(text);
  });
  note.append(why, retry);
}

async function send(text) {
  // Only the last turn can be retried: a message resent after later ones would answer another question.
  for (const button of $("messages").querySelectorAll("button.retry")) button.remove();
  const box = addMessage("user", text);
  box.dataset.role = "user";
  const answer = addMessage("assistant", "");
  answer.dataset.state = "waiting";
  answer.dataset.chunks = "0";
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  const body = {
    model: state.model, messages, stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 96,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value) || 1,
  };
  // This send's own controller and conversation: "New chat" may replace both before it finishes.
  const controller = new AbortController();
  const conversation = state.conversation;
  state.controller = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let firstAt = null, text_ = "", usage = null, finish = null, failure = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: controller.signal,
    }, true);
    answer.dataset.state = "streaming";
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece) {
          if (firstAt === null) firstAt = performance.now();
          text_ += piece;
          answer.textContent = text_;
          answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    answer.dataset.state = "done";
  } catch (err) {
    answer.dataset.state = err.name === "AbortError" ? "stopped" : "error";
    if (err.name !== "AbortError") failure = err;
  } finally {
    // A stopped turn stays in the context with its partial answer, as the page shows it; a failed one
    // is shown as left out (see showFailure); a turn of a conversation that "New chat" dropped goes nowhere.
    const current = conversation === state.conversation;
    if (failure === null && current) {
      state.history.push({ role: "user", content: text }, { role: "assistant", content: text_ });
    }
    box.dataset.context = answer.dataset.context = failure === null ? "in" : "out";
    if (failure !== null) box.title = answer.title = "not part of the conversation: the model is not given this";
    const meta = document.createElement("span");
    meta.className = "meta";
    const total = (performance.now() - started) / 1000;
    const parts = [];
    if (firstAt !== null) parts.push("first token " + ((firstAt - started) / 1000).toFixed(2) + " s");
    if (usage) parts.push(usage.completion_tokens + " tokens in " + total.toFixed(2) + " s");
    if (finish) parts.push("finish: " + finish);
    if (answer.dataset.state === "stopped") parts.push("stopped, kept in the conversation");
    if (failure !== null) parts.push("failed, not in the conversation");
    meta.textContent = parts.join(" · ");
    answer.textContent = text_;
    answer.appendChild(meta);
    if (failure !== null && current) showFailure(failure.message, text, [box, answer]);
    if (state.controller === controller) {   // else "New chat" (and maybe a newer send) took over
      state.controller = null;
      $("send").disabled = false;
      $("stop").disabled = true;
    }
  }
}

// --- pipeline panel ---------------------------------------------------------------------------------
function fmtMs(seconds) {
  return seconds === null || seconds === undefined ? "–" : (seconds * 1000).toFixed(1) + " ms";
}

function renderPipeline(status) {
  const p = status.pipeline || {};
  $("epoch").textContent = "epoch " + p.epoch;
  const list = $("stages");
  list.replaceChildren();
  (p.stages || []).forEach((s, i) => {
    const li = document.createElement("li");
    li.dataset.stage = String(i);
    const name = document.createElement("strong");
    name.textContent = "S" + i;
    const units = document.createElement("span");
    units.className = "units";
    units.textContent = "units [" + s.start + ", " + s.end + ")";
    const dev = document.createElement("span");
    dev.className = "device";
    dev.textContent = (s.device || "") + (s.pid ? " · pid " + s.pid : "");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = s.kv_capacity ? (100 * s.kv_used / s.kv_capacity).toFixed(1) + "%" : "0";
    bar.title = s.kv_capacity ? "KV " + s.kv_used + " / " + s.kv_capacity + " blocks" : "";
    bar.appendChild(fill);
    li.append(name, units, dev, bar);
    list.appendChild(li);
  });
  $("devices").textContent = String(p.reserved_devices);
  $("load").textContent = p.running + " running, " + p.waiting + " waiting";
  $("kv").value = p.kv_usage || 0;
  $("kv-text").textContent = p.kv_blocks_total
    ? p.kv_blocks_used + " / " + p.kv_blocks_total + " blocks" : ((100 * (p.kv_usage || 0)).toFixed(0) + "%");
  $("reshapes").textContent = p.reshapes_total + " (total pause " + fmtMs(p.pause_total_s) + ")";
  const last = (p.reshapes || [])[p.reshapes.length - 1];
  if (last) {
    const what = last.from_stages !== undefined && last.to_stages !== undefined
      ? last.from_stages + " → " + last.to_stages + " stages" : "to epoch " + (last.epoch ?? "?");
    $("last-reshape").textContent = what + ", pause " + fmtMs(last.pause_s);
  }
  const decisions = (p.decisions || []).slice(-6).reverse();
  const ul = $("decisions");
  ul.replaceChildren();
  if (!decisions.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "none yet";
    ul.appendChild(li);
  }
  for (const d of decisions) {
    const li = document.createElement("li");
    li.textContent = d.summary || d.reason || JSON.stringify(d);
    ul.appendChild(li);
  }
}

async function pollStatus() {
  try {
    const response = await api("/v1/flexpipe/status");
    renderPipeline(await response.json());
    setConn("connected", "ok");
  } catch (err) {
    setConn(err.status === 401 ? "API key needed" : "offline", "bad");
  } finally {
    setTimeout(pollStatus, 1000);
  }
}

// `first`: the page's own first load, which may ask for the key (retries and key changes do not).
async function loadModel(first = false) {
  try {
    const response = await api("/v1/models", {}, first);
    const models = (await response.json()).data || [];
    state.model = models.length ? models[0].id : null;
    $("model").textContent = state.model ? state.model + " · " + models[0].max_model_len + " ctx" : "no model";
  } catch (err) {
    $("model").textContent = "?";
    setTimeout(loadModel, 2000);
  }
}

// --- wiring -------------------------------------------------------------------------------------------
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
// Stops the answer being streamed, if any: it would keep the server generating and Send disabled.
$("reset").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.controller = null;
  state.conversation += 1;
  state.history = [];
  $("send").disabled = false;
  $("stop").disabled = true;
  $("messages").replaceChildren();
});
$("api-key").value = localStorage.getItem("flexpipe-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("flexpipe-api-key", $("api-key").value.trim());
  loadModel();
});
$("reshape-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const stages = Number($("reshape-stages").value);
  $("reshape-result").textContent = "reshaping…";
  try {
    const response = await api("/v1/flexpipe/reshape", { method: "POST", body: JSON.stringify({ stages }) }, true);
    const stats = (await response.json()).stats || {};
    const pause = stats.pause_s ?? (stats.pause_ms !== undefined ? stats.pause_ms / 1000 : null);
    $("reshape-result").textContent = "done, pause " + fmtMs(pause);
  } catch (err) {
    $("reshape-result").textContent = err.message;
  }
});

loadModel(true);
pollStatus();
