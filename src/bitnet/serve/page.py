"""The chat page served at ``/``: plain HTML + JavaScript, streams tokens from ``/v1/chat/completions``."""

CHAT_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bitnet chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 0 auto; padding: 1rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: .5rem; min-height: 16rem; max-height: 60vh;
         overflow-y: auto; }
  .msg { white-space: pre-wrap; margin: .4rem 0; }
  .user { color: #124; font-weight: 600; }
  .assistant { color: #222; }
  .error { color: #a00; }
  form { display: flex; gap: .5rem; margin-top: .5rem; }
  #input { flex: 1; }
  #settings { margin-top: .5rem; font-size: .9rem; color: #444; }
  #settings input { width: 5rem; }
</style>
</head>
<body>
<h1>bitnet chat <small id="model">{{MODEL}}</small></h1>
<div id="log" aria-live="polite"></div>
<form id="form">
  <input id="input" autocomplete="off" placeholder="Type a message and press Enter">
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
  <button id="reset" type="button">Reset</button>
</form>
<div id="settings">
  temperature <input id="temperature" type="number" step="0.1" min="0" max="2" value="0.8">
  top_p <input id="top_p" type="number" step="0.05" min="0.05" max="1" value="0.95">
  max tokens <input id="max_tokens" type="number" min="1" value="200">
  <span id="status">ready</span>
</div>
<script>
const log = document.getElementById("log"), form = document.getElementById("form");
const input = document.getElementById("input"), sendBtn = document.getElementById("send");
const stopBtn = document.getElementById("stop"), statusEl = document.getElementById("status");
let history = [], controller = null;

// The default answer length must fit the model's context (a 128-token model cannot take 200 new tokens):
// half the context, at most 200, from what /v1/models reports.
fetch("/v1/models").then(r => r.json()).then(info => {
  const ctx = info.data && info.data[0] && info.data[0].context_length;
  if (!ctx) return;
  const box = document.getElementById("max_tokens");
  box.max = String(ctx - 1);
  box.value = String(Math.max(1, Math.min(parseInt(box.value, 10), Math.floor(ctx / 2))));
  box.dataset.fitted = "true";
}).catch(() => {});

function add(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

async function send(text) {
  history.push({role: "user", content: text});
  add("user", "You: " + text);
  const out = add("assistant", "");
  out.dataset.done = "false";
  let answer = "";
  controller = new AbortController();
  sendBtn.disabled = true; stopBtn.disabled = false; statusEl.textContent = "generating";
  try {
    const body = {model: document.getElementById("model").textContent, messages: history, stream: true,
                  temperature: parseFloat(document.getElementById("temperature").value),
                  top_p: parseFloat(document.getElementById("top_p").value),
                  max_tokens: parseInt(document.getElementById("max_tokens").value, 10)};
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
                                                       body: JSON.stringify(body), signal: controller.signal});
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({error: {message: resp.statusText}}));
      throw new Error(err.error ? err.error.message : resp.statusText);
    }
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    outer: while (true) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") break outer;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices || []) {
          if (c.delta && c.delta.content) { answer += c.delta.content; out.textContent = answer; }
          if (c.finish_reason) out.dataset.finish = c.finish_reason;
        }
        log.scrollTop = log.scrollHeight;
      }
    }
    history.push({role: "assistant", content: answer});
    statusEl.textContent = "ready";
  } catch (e) {
    if (e.name === "AbortError") { history.push({role: "assistant", content: answer}); statusEl.textContent = "stopped"; }
    else { history.pop(); add("error", "error: " + e.message); statusEl.textContent = "error"; }
  } finally {
    out.dataset.done = "true";
    controller = null; sendBtn.disabled = false; stopBtn.disabled = true;
  }
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
document.getElementById("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history = []; log.textContent = ""; statusEl.textContent = "ready";
});
</script>
</body>
</html>
"""
