"""The web chat page: served without any outside resource, and its streaming client run under node."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import llama4.serve.app as serve_app
from tests.serve.conftest import MODEL_ID

STATIC = Path(serve_app.__file__).parent / "static"
NODE = shutil.which("node")


def test_the_page_and_its_scripts_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="send"', 'id="stop"', 'id="image"', 'id="temperature"', 'id="max-tokens"'):
        assert element in page.text
    for script in ("client.js", "ui.js"):
        response = httpx.get(f"{server.url}/static/{script}")
        assert response.status_code == 200 and "javascript" in response.headers["content-type"]


def test_nothing_is_loaded_from_outside_the_server():
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), f"{path.name} loads a remote resource"
        assert not re.search(r"""(import|fetch)\s*\(?\s*["'`]https?://""", text), f"{path.name} loads a remote resource"


NODE_SCRIPT = """
import { modelId, streamChat, parseSSE } from "%(client)s";
const base = "%(base)s";
const split = parseSSE('data: {"a":1}\\n\\ndata: [DONE]\\n\\ndata: {"b"');
const model = await modelId(base, "");
const pieces = [];
const result = await streamChat({ base, body: { model, messages: %(messages)s, max_tokens: 20, temperature: 0 },
                                  onText: (p) => pieces.push(p) });
const controller = new AbortController();
let stopped = "no";
try {
  await streamChat({ base, signal: controller.signal, onText: () => controller.abort(),
                     body: { model, messages: %(messages)s, max_tokens: 1500, temperature: 0 } });
} catch (e) { stopped = e.name; }
let error = null;
try {
  await streamChat({ base, body: { model: "nope", messages: %(messages)s } });
} catch (e) { error = [e.status, e.message]; }
console.log(JSON.stringify({ split, model, pieces, result, stopped, error }));
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed: the page's client module cannot be run")
def test_the_page_client_streams_stops_and_reports_errors(server, client):
    messages = [{"role": "user", "content": "Hello Max"}]
    plain = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0)
    script = NODE_SCRIPT % {"client": (STATIC / "client.js").as_uri(), "base": server.url,
                            "messages": json.dumps(messages)}
    cancelled_before = server.app.state.metrics.finished["cancelled"]
    run = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["split"] == {"events": ['{"a":1}', "[DONE]"], "rest": 'data: {"b"'}
    assert out["model"] == MODEL_ID
    assert "".join(out["pieces"]) == out["result"]["text"] == plain.choices[0].message.content
    assert out["result"]["finishReason"] == "length" and out["result"]["usage"]["completion_tokens"] == 20
    assert out["stopped"] == "AbortError"
    assert out["error"][0] == 404 and "does not exist" in out["error"][1]
    # the server cancelled the stopped reply (it did not run on to its 1,500 tokens)
    finished = server.app.state.metrics.finished
    deadline = time.monotonic() + 10
    while finished["cancelled"] == cancelled_before:
        assert time.monotonic() < deadline, "the stopped reply was not cancelled"
        time.sleep(0.01)
