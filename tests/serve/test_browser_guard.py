"""BrowserGuard: Host (DNS rebinding), Origin and Content-Type checks, CORS, and the security headers, on a
tiny app; then the real chat page under its Content-Security-Policy (parsed, and in headless Chromium)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.testclient import TestClient

from llama4.serve.browser_guard import API_CSP, BrowserGuard, GuardPolicy, page_csp
from llama4.serve.errors import install_handlers

STATIC = Path(__file__).parents[2] / "src" / "llama4" / "serve" / "static"
LOCAL = "http://localhost:8000"
CHUNKS = [f"data: {i}\n\n" for i in range(5)]
SECURITY = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def make_app(policy: GuardPolicy) -> FastAPI:
    """A GET, a JSON POST (noting what it received in ``app.state.ran``), a stream, an HTML page, the chat page."""
    app = FastAPI()
    app.state.ran = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/echo")
    async def echo(request: Request):
        body = await request.json()
        app.state.ran.append(body)
        return {"got": body}

    @app.get("/stream")
    async def stream():
        async def chunks():
            for chunk in CHUNKS:
                yield chunk
                await asyncio.sleep(0)
        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/html")
    async def html():
        return HTMLResponse("<!doctype html><p>hi</p>")

    @app.get("/own-headers")
    async def own_headers():
        return JSONResponse({}, headers={"X-Frame-Options": "SAMEORIGIN", "Content-Security-Policy": "sandbox",
                                         "Vary": "Accept-Encoding"})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.ran.append(body)
        content = body["messages"][-1]["content"]
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
        pieces = [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in ("echo: ", text)]
        pieces += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                   {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}]

        async def events():
            for piece in pieces:
                yield f"data: {json.dumps(piece)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    install_handlers(app)
    app.add_middleware(BrowserGuard, policy=policy)
    return app


def client(policy: GuardPolicy, base_url: str = LOCAL) -> TestClient:
    return TestClient(make_app(policy), base_url=base_url)


def loopback(**kwargs) -> TestClient:
    return client(GuardPolicy.for_bind("127.0.0.1", **kwargs))


def assert_openai_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def post(c: TestClient, content_type: str | None = "application/json", origin: str | None = None,
         path: str = "/v1/echo", **headers):
    if content_type is not None:
        headers["Content-Type"] = content_type
    if origin is not None:
        headers["Origin"] = origin
    return c.post(path, content=b'{"prompt": "hi"}', headers=headers)


# Host: DNS rebinding


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "localhost."])
def test_a_loopback_bind_answers_to_local_names(host):
    c = loopback()
    assert c.get("/v1/models", headers={"Host": host}).status_code == 200
    assert post(c, Host=host).json() == {"got": {"prompt": "hi"}}


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_loopback_bind_refuses_other_names_against_dns_rebinding(method):
    c = loopback()
    response = c.request(method, "/v1/echo" if method == "POST" else "/v1/models", content=b"{}",
                         headers={"Host": "evil.example:8000", "Content-Type": "application/json"})
    error = assert_openai_error(response, 421, "host_not_allowed")
    assert "'evil.example:8000'" in error["message"] and "--allowed-hosts evil.example" in error["message"]
    assert c.app.state.ran == []
    assert response.headers["x-frame-options"] == "DENY"


def test_the_defaults_by_bind_address():
    local = ("localhost", "127.0.0.1", "::1")
    assert GuardPolicy.for_bind("127.0.0.1").allowed_hosts == local
    assert GuardPolicy.for_bind("::1").allowed_hosts == local
    assert GuardPolicy.for_bind("localhost").allowed_hosts == local
    assert GuardPolicy.for_bind("127.0.0.2").allowed_hosts == (*local, "127.0.0.2")
    for anywhere in ("0.0.0.0", "::", "192.168.1.5", "gpu-box.lan"):
        assert GuardPolicy.for_bind(anywhere).allowed_hosts is None
        assert GuardPolicy.for_bind(anywhere, []).allowed_hosts is None
    assert GuardPolicy.for_bind("0.0.0.0", ["API.example.com"]).allowed_hosts == (*local, "api.example.com")
    assert GuardPolicy.for_bind("192.168.1.5", ["gpu-box"]).allowed_hosts == ("192.168.1.5", "gpu-box")
    assert GuardPolicy.for_bind("127.0.0.1", ["*"]).allowed_hosts is None


def test_an_any_interface_bind_answers_to_any_name():
    c = client(GuardPolicy.for_bind("0.0.0.0"))
    for host in ("evil.example:8000", "gpu-box.lan", "10.0.0.7:8000", "localhost:8000"):
        assert post(c, Host=host).status_code == 200


def test_explicit_allowed_hosts():
    c = client(GuardPolicy(allowed_hosts=("gpu-box.lan", "[fd00::1]:8000")))
    assert c.get("/v1/models", headers={"Host": "GPU-box.lan:8000"}).status_code == 200
    assert c.get("/v1/models", headers={"Host": "[fd00::1]:9000"}).status_code == 200
    assert_openai_error(c.get("/v1/models", headers={"Host": "localhost:8000"}), 421, "host_not_allowed")
    c = client(GuardPolicy.for_bind("127.0.0.1", allowed_hosts=["gpu-box.lan"]))
    for host in ("gpu-box.lan:8000", "localhost:8000"):
        assert c.get("/v1/models", headers={"Host": host}).status_code == 200


# Origin: simple cross-origin requests


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/json", None])
def test_a_cross_origin_post_is_refused_and_never_runs(content_type):
    c = loopback()
    error = assert_openai_error(post(c, content_type, origin="https://evil.example"), 403, "origin_not_allowed")
    assert "'https://evil.example'" in error["message"] and "--allowed-origins" in error["message"]
    assert_openai_error(post(c, content_type, origin="null"), 403, "origin_not_allowed")  # sandboxed frames
    assert c.app.state.ran == []


def test_a_same_origin_post_passes():
    c = loopback()
    assert post(c, origin=LOCAL).json() == {"got": {"prompt": "hi"}}
    assert post(c, origin="http://[::1]:8000", Host="[::1]:8000").status_code == 200
    assert post(c, origin="http://127.0.0.1", Host="127.0.0.1:80").status_code == 200
    for other in ("http://localhost:8001", "https://localhost:8000", "http://127.0.0.1:8000"):  # port, scheme, host
        assert_openai_error(post(c, origin=other), 403, "origin_not_allowed")
    assert len(c.app.state.ran) == 3


def test_reads_from_an_unknown_origin_pass_without_cors_headers():
    c = loopback()
    response = c.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


# Content-Type


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json", None])
def test_json_bodies_pass(content_type):
    c = loopback()
    assert post(c, content_type).json() == {"got": {"prompt": "hi"}}


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "text/json", "application/jsonx", ""])
def test_other_bodies_are_refused_with_415(content_type):
    c = loopback()
    for method in ("POST", "PUT", "PATCH"):
        response = c.request(method, "/v1/echo", content=b'{"prompt": "hi"}', headers={"Content-Type": content_type})
        error = assert_openai_error(response, 415, "unsupported_media_type")
        assert "Content-Type: application/json" in error["message"]
    assert c.app.state.ran == []


# CORS


def preflight(c: TestClient, origin: str, headers: str = "content-type"):
    return c.options("/v1/echo", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": headers})


def test_with_cors_off_a_preflight_gets_no_allow_origin():
    response = preflight(loopback(), "https://app.example")
    assert response.status_code == 403 and "access-control-allow-origin" not in response.headers


def test_with_cors_on_an_allowed_origin_is_served():
    c = loopback(allowed_origins=["https://app.example"])
    response = preflight(c, "https://app.example", "Content-Type, Authorization, X-Stainless-OS, bad header")
    assert response.status_code == 204 and response.content == b""
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert response.headers["access-control-allow-methods"] == "GET, POST, OPTIONS"
    assert response.headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert response.headers["access-control-max-age"] == "600" and response.headers["vary"] == "Origin"
    assert "access-control-allow-credentials" not in response.headers

    response = post(c, origin="https://app.example")
    assert response.json() == {"got": {"prompt": "hi"}}
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert response.headers["vary"] == "Origin" and "access-control-allow-credentials" not in response.headers
    # its errors are readable too
    response = post(c, "text/plain", origin="https://app.example")
    assert response.status_code == 415 and response.headers["access-control-allow-origin"] == "https://app.example"


def test_with_cors_on_other_origins_are_still_refused():
    c = loopback(allowed_origins=["https://app.example"])
    response = preflight(c, "https://evil.example")
    assert response.status_code == 403 and "access-control-allow-origin" not in response.headers
    response = post(c, origin="https://evil.example")
    assert_openai_error(response, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in response.headers and response.headers["vary"] == "Origin"
    response = c.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    assert c.app.state.ran == []


def test_cors_for_any_origin():
    c = loopback(allowed_origins=["*"])
    assert preflight(c, "https://any.example").status_code == 204
    response = post(c, origin="https://any.example")
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "https://any.example"


def test_allowed_origins_must_be_origins():
    assert GuardPolicy(allowed_origins=("HTTPS://App.example/",)).allowed_origins == ("https://app.example",)
    for bad in ("app.example", "https://app.example/path", "null"):
        with pytest.raises(ValueError, match="not an origin"):
            GuardPolicy(allowed_origins=(bad,))


# Security headers, streaming, other scopes


def assert_security_headers(response, csp: str) -> None:
    for name, value in SECURITY.items():
        assert response.headers.get_list(name) == [value], name
    assert response.headers.get_list("content-security-policy") == [csp]


def test_security_headers_on_every_response():
    c = loopback()
    assert_security_headers(c.get("/v1/models"), API_CSP)
    assert_security_headers(post(c, "text/plain"), API_CSP)
    assert_security_headers(c.get("/missing"), API_CSP)
    html = c.get("/html")
    assert_security_headers(html, GuardPolicy().html_csp)
    assert "default-src 'self'" in html.headers["content-security-policy"]
    streamed = c.get("/stream")
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert_security_headers(streamed, API_CSP)
    assert streamed.text == "".join(CHUNKS)


def test_headers_the_app_set_are_kept_not_duplicated():
    response = loopback(allowed_origins=["https://app.example"]).get("/own-headers")
    assert response.headers.get_list("x-frame-options") == ["SAMEORIGIN"]
    assert response.headers.get_list("content-security-policy") == ["sandbox"]
    assert response.headers.get_list("vary") == ["Accept-Encoding, Origin"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_a_stream_goes_out_chunk_by_chunk():
    """The app writes its second chunk only once the first has reached the server's ``send``: a middleware
    that buffered the body would stall it."""
    first_sent = asyncio.Event()
    sent = []
    body = [{"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True},
            {"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False}]

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send(body[0])
        await asyncio.wait_for(first_sent.wait(), 5)
        await send(body[1])

    async def send(message):
        sent.append(message)
        if message.get("body") == b"data: 1\n\n":
            first_sent.set()

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/stream", "scheme": "http", "headers": [(b"host", b"localhost")]}
    asyncio.run(BrowserGuard(app, GuardPolicy.for_bind("127.0.0.1"))(scope, receive, send))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert sent[1:] == body
    assert (b"x-frame-options", b"DENY") in sent[0]["headers"]


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
def test_other_scopes_pass_untouched(kind):
    seen = []

    async def app(scope, receive, send):
        seen.append((scope, receive, send))

    async def receive():
        return {}

    async def send(message):
        pass

    scope = {"type": kind, "headers": [(b"host", b"evil.example"), (b"origin", b"https://evil.example")]}
    asyncio.run(BrowserGuard(app, GuardPolicy.for_bind("127.0.0.1"))(scope, receive, send))
    assert seen == [(scope, receive, send)]


# The chat page under its CSP


class _PageScan(HTMLParser):
    """What a strict CSP would block in a page: inline scripts, event-handler and style attributes,
    javascript: URLs; and the text of its inline <style> blocks (allowed by hash)."""

    def __init__(self):
        super().__init__()
        self.blocked, self.styles, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in = tag if tag in ("script", "style") else None
        if tag == "style":
            self.styles.append("")
        if tag == "script" and not attrs.get("src"):
            self.blocked.append("an inline <script>")
        for name, value in attrs.items():
            if name.startswith("on") or name == "style":
                self.blocked.append(f"<{tag} {name}=...>")
            if (value or "").strip().lower().startswith("javascript:"):
                self.blocked.append(f"<{tag} {name}=javascript:...>")

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "style":
            self.styles[-1] += data
        elif self._in == "script" and data.strip():
            self.blocked.append("an inline <script> body")


def test_the_chat_page_has_nothing_its_csp_blocks():
    scan = _PageScan()
    scan.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    assert scan.blocked == []
    csp = dict(d.strip().split(" ", 1) for d in page_csp(STATIC / "index.html").split(";"))
    assert csp["script-src"] == csp["connect-src"] == "'self'" and "'unsafe-inline'" not in csp["style-src"]
    assert csp["img-src"] == "'self' data:"  # the previews of attached images are data: URLs
    for style in scan.styles:  # each inline <style> allowed by its hash, as a browser computes it
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp["style-src"].split()
    assert csp["frame-ancestors"] == "'none'"
    for script in STATIC.glob("*.js"):  # no string-to-code, nor markup that could bring inline handlers or styles
        text = script.read_text(encoding="utf-8")
        for pattern in (r"\beval\s*\(", r"new\s+Function\b", r"innerHTML|outerHTML|insertAdjacentHTML|document\.write",
                        r"setAttribute\(\s*[\"'](on|style)", r"set(Timeout|Interval)\(\s*[\"'`]"):
            assert not re.search(pattern, text), f"{script.name} matches {pattern}"


def test_the_chat_page_works_in_chromium_under_the_guard(tmp_path):
    """The page styled, connected (fetch), showing an attached image (data:) and streaming a reply (a JSON POST,
    same-origin) with no CSP report in the console; a fetch from a page of another origin is refused."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.serve.conftest import LiveServer, png

    debian = "/usr/bin/chromedriver"
    driver_path = debian if os.access(debian, os.X_OK) else shutil.which("chromedriver")
    if shutil.which("chromium") is None or driver_path is None:
        pytest.skip("headless Chromium is not installed (the Debian packages chromium and chromium-driver)")
    app = make_app(GuardPolicy.for_bind("127.0.0.1"))
    statuses = []

    async def recorded(scope, receive, send):  # what reached the server, and what it answered
        async def noting(message):
            if message["type"] == "http.response.start":
                statuses.append((scope["method"], scope["path"], message["status"]))
            await send(message)
        await app(scope, receive, noting if scope["type"] == "http" else send)

    elsewhere = FastAPI()
    elsewhere.get("/")(lambda: HTMLResponse("<!doctype html><p>another site</p>"))
    server, attacker = LiveServer(recorded), LiveServer(elsewhere)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(driver, 20, poll_frequency=0.02)
        driver.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "status").text == "model: fake")
        assert driver.execute_script("return getComputedStyle(document.body).display") == "flex"  # <style> applied

        picture = tmp_path / "red.png"
        picture.write_bytes(png(8, 8, (220, 30, 30)))
        driver.find_element(By.ID, "image").send_keys(str(picture))
        wait.until(lambda d: d.execute_script("const i = document.querySelector('#pending img');"
                                              "return i && i.complete && i.naturalWidth === 8"))
        driver.find_element(By.ID, "prompt").send_keys("hello")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log > .msg.assistant .meta"))
        assert driver.find_element(By.CSS_SELECTOR, "#log > .msg.assistant > span").text == "echo: hello"
        assert len(app.state.ran) == 1

        console = [e["message"] for e in driver.get_log("browser")]
        assert not [m for m in console if "Content Security Policy" in m], console

        driver.get(attacker.url + "/")  # a page of another origin posts a "simple" request: refused, never run
        status = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0] + '/v1/echo', {method: 'POST', body: '{}', headers: {'Content-Type': 'text/plain'}})"
            ".then(() => done('read'), (e) => done('failed'));", server.url)
        assert status == "failed" and statuses[-1] == ("POST", "/v1/echo", 403) and len(app.state.ran) == 1
    finally:
        driver.quit()
        server.close()
        attacker.close()
