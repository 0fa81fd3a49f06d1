"""The chat page ``GET /`` serves: one HTML file, no build step, no external resources. It streams answers from
``/v1/chat/completions`` and shows a thinking model's reasoning in a box of its own. ``/?prompt=TEXT`` sends TEXT
at once (what the headless-browser test uses); ``&key=KEY`` gives the API key."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>tensorweave</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:50rem;margin:0 auto;padding:1rem;color:#222}
#log{display:flex;flex-direction:column;gap:.6rem;margin-bottom:1rem}
.msg{white-space:pre-wrap;padding:.5rem .7rem;border-radius:.4rem}
.user{background:#e8f0fe;align-self:flex-end}.assistant{background:#f3f3f3}
.thinking{white-space:pre-wrap;color:#666;font-size:.9em;border-left:3px solid #ccc;padding-left:.5rem}
.error{color:#b00}form{display:flex;gap:.5rem}textarea{flex:1;font:inherit}
header{display:flex;justify-content:space-between;color:#666;font-size:.9em}
</style></head><body>
<header><span id="model">tensorweave</span><label>API key <input id="key" type="password" size="12"></label></header>
<div id="log"></div>
<form id="form"><textarea id="input" rows="3" placeholder="Message"></textarea><button>Send</button></form>
<script>
const log = document.getElementById("log"), input = document.getElementById("input");
const key = document.getElementById("key"), params = new URLSearchParams(location.search);
key.value = params.get("key") || localStorage.getItem("tw-key") || "";
const messages = [];
const headers = () => Object.assign({"Content-Type": "application/json"},
  key.value ? {"Authorization": "Bearer " + key.value} : {});
function add(cls, text, tag) {
  const el = document.createElement(tag || "div"); el.className = cls; el.textContent = text || "";
  log.appendChild(el); return el;
}
fetch("/v1/models", {headers: headers()}).then(r => r.json())
  .then(j => { document.getElementById("model").textContent = j.data[0].id; }).catch(() => {});
async function send(text) {
  localStorage.setItem("tw-key", key.value);
  messages.push({role: "user", content: text}); add("msg user", text);
  const box = add("msg assistant"), think = document.createElement("details"), thought = add("thinking", "", "div");
  think.innerHTML = "<summary>thinking</summary>"; think.appendChild(thought); think.hidden = true;
  box.appendChild(think); const answer = document.createElement("span"); answer.className = "answer";
  box.appendChild(answer);
  const res = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
    body: JSON.stringify({messages, stream: true})});
  if (!res.ok) { answer.className = "error"; answer.textContent = (await res.json()).error.message; return; }
  const reader = res.body.getReader(), decoder = new TextDecoder(); let buffer = "";
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split(/\\r?\\n\\r?\\n/); buffer = events.pop();
    for (const ev of events) {
      const data = ev.split(/\\r?\\n/).filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\\n");
      if (!data || data === "[DONE]") continue;
      const j = JSON.parse(data);
      if (j.error) { answer.className = "error"; answer.textContent = j.error.message; continue; }
      const d = (j.choices[0] || {}).delta || {};
      if (d.reasoning_content) { think.hidden = false; thought.textContent += d.reasoning_content; }
      if (d.content) answer.textContent += d.content;
    }
  }
  messages.push({role: "assistant", content: answer.textContent});
  box.dataset.done = "1";
}
document.getElementById("form").onsubmit = e => {
  e.preventDefault(); const text = input.value.trim(); if (text) { input.value = ""; send(text); }
};
input.onkeydown = e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); } };
if (params.get("prompt")) send(params.get("prompt"));
</script></body></html>
"""
