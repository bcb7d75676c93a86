// The chat page: conversation, image upload, streamed answers, stop button, settings.
import { modelId, streamChat } from "./client.js";

const $ = (id) => document.getElementById(id);
const base = window.location.origin;
const history = [];  // OpenAI messages of the conversation so far
let pendingImages = [];  // data: URLs attached to the next message
let model = null;
let controller = null;

$("api-key").value = localStorage.getItem("llama4-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("llama4-api-key", $("api-key").value); connect(); });

async function connect() {
  try {
    model = await modelId(base, $("api-key").value);
    $("status").textContent = "model: " + model;
  } catch (e) {
    $("status").textContent = "not connected: " + e.message;
  }
}

function bubble(kind, text, images = []) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  for (const url of images) {
    const img = document.createElement("img");
    img.src = url;
    div.appendChild(img);
  }
  const body = document.createElement("span");
  body.textContent = text;
  div.appendChild(body);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return { div, body };
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

$("attach").addEventListener("click", () => $("image").click());
$("image").addEventListener("change", async () => {
  for (const file of $("image").files) pendingImages.push(await readAsDataURL(file));
  $("image").value = "";
  $("pending").replaceChildren(...pendingImages.map((url) => Object.assign(document.createElement("img"), { src: url })));
});

$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("log").replaceChildren();
});

$("stop").addEventListener("click", () => { if (controller) controller.abort(); });

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if ((!text && !pendingImages.length) || controller) return;
  if (!model) await connect();
  const images = pendingImages;
  pendingImages = [];
  $("pending").replaceChildren();
  $("prompt").value = "";
  const content = images.length
    ? [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }]
    : text;
  history.push({ role: "user", content });
  bubble("user", text, images);
  const reply = bubble("assistant", "");
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : [...history];
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const result = await streamChat({
      base, apiKey: $("api-key").value, signal: controller.signal,
      body: { model, messages, temperature: Number($("temperature").value),
              max_tokens: Number($("max-tokens").value) },
      onText: (piece) => { reply.body.textContent += piece; $("log").scrollTop = $("log").scrollHeight; },
    });
    history.push({ role: "assistant", content: result.text });
    const meta = document.createElement("div");
    meta.className = "meta";
    const usage = result.usage ? `, ${result.usage.completion_tokens} tokens` : "";
    meta.textContent = `${result.finishReason || "done"}${usage}`;
    reply.div.appendChild(meta);
  } catch (err) {
    if (err.name === "AbortError") {
      history.push({ role: "assistant", content: reply.body.textContent });
      reply.div.appendChild(Object.assign(document.createElement("div"), { className: "meta", textContent: "stopped" }));
    } else {
      history.pop();  // the failed turn is not part of the conversation
      reply.div.className = "msg error";
      reply.body.textContent = "error: " + err.message;
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
});

connect();
