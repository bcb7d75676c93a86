// The page's talk with the server: OpenAI chat completions streamed over SSE.
// No DOM here, so the same module runs in the browser and under node (the tests drive it there).

/** Split SSE text into complete `data:` payloads; returns them and the unfinished rest. */
export function parseSSE(buffer) {
  const events = [];
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, cut);
    buffer = buffer.slice(cut + 2);
    const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
    if (data.length) events.push(data.join("\n"));
  }
  return { events, rest: buffer };
}

/** An error carrying the server's OpenAI-format message. */
export class ServerError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

async function failure(response) {
  let message = response.statusText;
  try {
    message = (await response.json()).error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  return new ServerError(response.status, message);
}

/** The served model's id (the first of /v1/models). */
export async function modelId(base, apiKey) {
  const response = await fetch(base + "/v1/models", { headers: headers(apiKey) });
  if (!response.ok) throw await failure(response);
  return (await response.json()).data[0].id;
}

/**
 * Stream a chat reply: calls onText(piece) for each content delta and resolves to
 * { text, finishReason, usage }. Aborting `signal` closes the connection, which cancels the
 * request on the server (its batch slot is freed at once).
 */
export async function streamChat({ base, apiKey, body, onText, signal }) {
  const request = { ...body, stream: true, stream_options: { include_usage: true } };
  const response = await fetch(base + "/v1/chat/completions", {
    method: "POST", headers: headers(apiKey), body: JSON.stringify(request), signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", finishReason = null, usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const parsed = parseSSE(buffer);
    buffer = parsed.rest;
    for (const data of parsed.events) {
      if (data === "[DONE]") return { text, finishReason, usage };
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ServerError(500, chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          text += piece;
          if (onText) onText(piece);
        }
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
  }
  return { text, finishReason, usage };
}
