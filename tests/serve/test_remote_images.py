"""http(s) image URLs: fetched only with allow_remote_images, only from public addresses by default, within one
deadline, a byte cap and a bound on concurrent fetches; every network failure reads the same, as a 400."""

from __future__ import annotations

import base64
import logging
import re
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from llama4.prompt import ImageError
from llama4.serve import remote_images
from llama4.serve.app import create_app
from llama4.serve.remote_images import (
    BUSY_TEXT,
    RemoteImageFetcher,
    RemoteImagePolicy,
    fetch_image,
    inline_remote_images,
    unreachable_text,
)
from tests.serve.conftest import MODEL_ID, LiveServer, png

RED = png(300, 200, (255, 0, 0))
# the test servers listen on 127.0.0.1: allowed here as an "internal image host", and nothing else private is
LOCAL = RemoteImagePolicy(allowed_ports=None, allowed_networks=("127.0.0.1/32",))
TRICKLE_PAUSE_S = 0.1


class Images(BaseHTTPRequestHandler):
    """Serves RED, and the misbehaviours a fetcher must survive; records each request it sees."""

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Host")))
        route = self.path.split("/")[1]
        getattr(self, "route_" + route.replace("-", "_").replace(".", "_"), self.route_missing)()

    def route_red_png(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(RED)))
        self.end_headers()
        self.wfile.write(RED)

    def route_missing(self):
        self.send_error(404)

    def redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.end_headers()

    def route_loop(self):
        self.redirect("/loop")

    def route_hops(self):
        left = int(self.path.split("/")[2])
        self.redirect(f"/hops/{left - 1}" if left else "/red.png")

    def route_away(self):
        self.redirect(self.server.redirect_to)

    def route_gate(self):
        self.server.arrived.set()
        self.server.gate.wait(5)
        self.route_red_png()

    def route_slow_body(self):
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        self.trickle(b"x")

    def route_slow_headers(self):
        self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        self.trickle(b"a")

    def route_huge_declared(self):
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: 1000000000\r\n\r\n")

    def route_endless_chunked(self):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.flood(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")

    def route_endless(self):
        self.wfile.write(b"HTTP/1.0 200 OK\r\n\r\n")
        self.flood(b"x" * 0x10000)

    def trickle(self, byte: bytes):
        for _ in range(100):
            if self.server.stopping.wait(TRICKLE_PAUSE_S) or not self.send(byte):
                return

    def flood(self, piece: bytes):
        for _ in range(10_000):
            if self.server.stopping.is_set() or not self.send(piece):
                return

    def send(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            return True
        except OSError:
            return False

    def log_message(self, *args):
        pass


class ImageHost:
    def __init__(self, address: str = "127.0.0.1"):
        self.httpd = ThreadingHTTPServer((address, 0), Images)
        self.httpd.seen, self.httpd.redirect_to = [], "/red.png"
        self.httpd.stopping, self.httpd.arrived, self.httpd.gate = (threading.Event() for _ in range(3))
        self.port = self.httpd.server_address[1]
        self.url = f"http://{address}:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def seen(self) -> list[tuple[str, str]]:
        return self.httpd.seen

    def close(self):
        self.httpd.stopping.set()
        self.httpd.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_host():
    host = ImageHost()
    yield host
    host.close()


@pytest.fixture
def other_loopback_host():
    """A second image host, on 127.0.0.2: loopback, but outside LOCAL's allowed network."""
    try:
        host = ImageHost("127.0.0.2")
    except OSError:
        pytest.skip("cannot listen on 127.0.0.2 here")
    yield host
    host.close()


@pytest.fixture
def connections(monkeypatch):
    """The addresses each fetch connected to (the real connect still runs)."""
    tried = []
    real = remote_images._connect

    def connect(addresses, deadline):
        tried.append(addresses)
        return real(addresses, deadline)

    monkeypatch.setattr(remote_images, "_connect", connect)
    return tried


@pytest.fixture
def lookups(monkeypatch):
    """The host names each fetch resolved (the real resolve still runs)."""
    names = []
    real = remote_images._resolve

    def resolve(host, port, deadline):
        names.append(host)
        return real(host, port, deadline)

    monkeypatch.setattr(remote_images, "_resolve", resolve)
    return names


@pytest.fixture
def dns(monkeypatch):
    """A fake DNS for names put in the returned dict: name -> addresses, or an exception to raise."""
    zone: dict[str, list[str] | Exception] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in zone:
            return real(host, port, *args, **kwargs)
        answer = zone[host]
        if isinstance(answer, Exception):
            raise answer
        return [info for address in answer for info in real(address, port, *args, **kwargs)]

    monkeypatch.setattr(remote_images.socket, "getaddrinfo", getaddrinfo)
    return zone


def failure(fetch, url: str) -> str:
    """The error text of a fetch that must fail, with the URL taken out."""
    with pytest.raises(ImageError) as caught:
        fetch(url)
    return str(caught.value).replace(url[:80], "<url>")


GENERIC = unreachable_text("<url>")


# --------------------------------------------------------------------------- fetching, and what it refuses


def test_a_good_fetch_works(image_host):
    assert fetch_image(image_host.url + "/red.png", RemoteImagePolicy(allow_private=True, allowed_ports=None)) == RED
    assert RemoteImageFetcher(LOCAL).fetch(image_host.url + "/red.png") == RED


@pytest.mark.parametrize("host", [
    "127.0.0.1", "localhost", "[::1]", "0.0.0.0", "0", "127.1", "2130706433", "169.254.169.254", "10.0.0.1",
    "172.16.0.1", "192.168.1.1", "100.64.0.1", "224.0.0.1", "[::]", "[::ffff:127.0.0.1]", "[::127.0.0.1]",
    "[fd00::1]", "[fe80::1]", "[fec0::1]", "[2002:7f00:1::]", "[64:ff9b::7f00:1]",
])
def test_the_default_rules_refuse_non_public_addresses_without_connecting(image_host, connections, host):
    url = f"http://{host}:{image_host.port}/red.png"
    assert failure(RemoteImageFetcher(RemoteImagePolicy(allowed_ports=None)).fetch, url) == GENERIC
    assert connections == [] and image_host.seen == []


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700::1", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address):
    assert RemoteImagePolicy().allows_address(address)


def test_a_public_name_that_resolves_to_a_private_address_is_refused(image_host, dns, connections):
    dns["images.example.com"] = ["127.0.0.1"]
    dns["mixed.example.com"] = ["93.184.216.34", "127.0.0.1"]
    fetcher = RemoteImageFetcher(RemoteImagePolicy(allowed_ports=None))
    for name in dns:
        assert failure(fetcher.fetch, f"http://{name}:{image_host.port}/red.png") == GENERIC
    assert connections == [] and image_host.seen == []


def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(image_host, monkeypatch):
    answers = iter(["127.0.0.1", "169.254.169.254", "169.254.169.254"])  # a rebinding DNS: safe first, then not
    real = socket.getaddrinfo
    rebinding = lambda host, port, *args, **kwargs: real(next(answers), port, *args, **kwargs)  # noqa: E731
    monkeypatch.setattr(remote_images.socket, "getaddrinfo", rebinding)
    assert RemoteImageFetcher(LOCAL).fetch(f"http://Bücher.example:{image_host.port}/red.png") == RED
    assert image_host.seen == [("/red.png", f"xn--bcher-kva.example:{image_host.port}")]


def test_a_redirect_to_a_forbidden_address_is_refused(image_host, other_loopback_host, connections):
    image_host.httpd.redirect_to = other_loopback_host.url + "/red.png"
    assert failure(RemoteImageFetcher(LOCAL).fetch, image_host.url + "/away") == GENERIC
    assert other_loopback_host.seen == [] and len(connections) == 1
    all_loopback = replace(LOCAL, allowed_networks=("127.0.0.0/8",))
    assert RemoteImageFetcher(all_loopback).fetch(image_host.url + "/away") == RED


def test_a_redirect_to_a_port_or_scheme_not_allowed_is_refused(image_host):
    only_this_port = replace(LOCAL, allowed_ports=(image_host.port,))
    for location in ("http://127.0.0.1:9/red.png", "ftp://127.0.0.1/red.png", "http://u:p@127.0.0.1/red.png"):
        image_host.httpd.redirect_to = location
        assert failure(RemoteImageFetcher(only_this_port).fetch, image_host.url + "/away") == GENERIC


def test_redirects_stop_at_max_redirects(image_host):
    fetcher = RemoteImageFetcher(replace(LOCAL, max_redirects=3))
    assert fetcher.fetch(image_host.url + "/hops/2") == RED  # 3 redirects: /hops/2, /hops/1, /hops/0
    assert failure(fetcher.fetch, image_host.url + "/hops/3") == GENERIC
    image_host.seen.clear()
    assert failure(fetcher.fetch, image_host.url + "/loop") == GENERIC
    assert len(image_host.seen) == 4


@pytest.mark.parametrize("route", ["/slow-body", "/slow-headers"])
def test_a_trickling_server_is_cut_off_at_the_deadline(image_host, route):
    fetcher = RemoteImageFetcher(replace(LOCAL, deadline_s=1.0))
    start = time.monotonic()
    assert failure(fetcher.fetch, image_host.url + route) == GENERIC
    assert 1.0 - TRICKLE_PAUSE_S <= time.monotonic() - start < 2.0


@pytest.mark.parametrize("route", ["/huge-declared", "/endless-chunked", "/endless"])
def test_a_body_over_the_cap_is_refused(image_host, route):
    fetcher = RemoteImageFetcher(replace(LOCAL, max_bytes=1_000_000))
    start = time.monotonic()
    assert failure(fetcher.fetch, image_host.url + route) == GENERIC
    assert time.monotonic() - start < 1.0


def test_the_byte_cap_cuts_a_large_image(image_host):
    assert fetch_image(image_host.url + "/red.png", replace(LOCAL, max_bytes=len(RED))) == RED
    assert failure(lambda url: fetch_image(url, replace(LOCAL, max_bytes=100)), image_host.url + "/red.png") == GENERIC


def test_every_network_failure_reads_the_same(image_host, other_loopback_host, dns, caplog):
    caplog.set_level(logging.DEBUG, logger="llama4.serve.remote_images")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    dns["no-such-host.example"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    image_host.httpd.redirect_to = other_loopback_host.url + "/red.png"
    fetcher = RemoteImageFetcher(replace(LOCAL, deadline_s=1.0, max_bytes=100))
    try:
        texts = {
            "refused": failure(fetcher.fetch, f"http://127.0.0.1:{closed.getsockname()[1]}/red.png"),
            "HTTP 404": failure(fetcher.fetch, image_host.url + "/missing.png"),
            "302 to loopback": failure(fetcher.fetch, image_host.url + "/away"),
            "timeout": failure(fetcher.fetch, image_host.url + "/slow-headers"),
            "too large": failure(fetcher.fetch, image_host.url + "/red.png"),
            "no such host": failure(fetcher.fetch, "http://no-such-host.example/red.png"),
            "TLS to a plain server": failure(fetcher.fetch, f"https://127.0.0.1:{image_host.port}/red.png"),
            "private address": failure(RemoteImageFetcher(RemoteImagePolicy()).fetch, "http://127.0.0.1/red.png"),
        }
    finally:
        closed.close()
    assert set(texts.values()) == {GENERIC}
    for reason in ("ConnectionRefusedError", "HTTP 404", "127.0.0.2 is not an address", "TimeoutError", "over the cap",
                   "lookup of no-such-host.example failed", "SSL"):
        assert reason in caplog.text


@pytest.mark.parametrize("url, rule", [
    ("ftp://example.com/red.png", "only http or https image URLs"),
    ("file:///etc/passwd", "only http or https image URLs"),
    ("http://user:secret@example.com/red.png", "must not carry a user name or password"),
    ("http://user@example.com/red.png", "must not carry a user name or password"),
    ("http://example.com:8080/red.png", "may only use port 80, 443, got 8080"),
    ("http://example.com:99999/red.png", "port must be a number from 1 to 65535"),
    ("http:///red.png", "no host name"),
    ("http://[::1/red.png", "malformed"),
    ("http://exa mple.com/red.png", "characters a host name cannot have"),
    ("http://" + "ü" * 70 + ".example/red.png", "not a valid internationalised domain name"),
])
def test_a_url_that_breaks_a_rule_is_refused_naming_the_rule_without_a_lookup(lookups, url, rule):
    with pytest.raises(ImageError, match=re.escape(rule)):
        fetch_image(url)
    assert lookups == []


def test_only_the_allowed_schemes_are_fetched(lookups):
    with pytest.raises(ImageError, match="only https image URLs"):
        RemoteImageFetcher(RemoteImagePolicy(allowed_schemes=("https",))).fetch("http://example.com/red.png")
    assert lookups == []


# --------------------------------------------------------------------------- the bound on fetches in flight


def test_a_fetch_beyond_max_concurrent_waits_at_most_max_wait_s(image_host):
    fetcher = RemoteImageFetcher(replace(LOCAL, max_concurrent=1, max_wait_s=0.2))
    first: list[bytes] = []
    in_flight = threading.Thread(target=lambda: first.append(fetcher.fetch(image_host.url + "/gate")))
    in_flight.start()
    try:
        assert image_host.httpd.arrived.wait(2)
        start = time.monotonic()
        with pytest.raises(ImageError, match=re.escape(BUSY_TEXT)):
            fetcher.fetch(image_host.url + "/red.png")
        assert 0.15 <= time.monotonic() - start < 1.0
    finally:
        image_host.httpd.gate.set()
        in_flight.join(5)
    assert first == [RED]
    assert failure(fetcher.fetch, image_host.url + "/missing.png") == GENERIC
    assert fetcher.fetch(image_host.url + "/red.png") == RED  # failed fetches gave their slot back


# --------------------------------------------------------------------------- the policy and the message helpers


@pytest.mark.parametrize("fields, complaint", [
    ({"allowed_schemes": ("ftp",)}, "allowed_schemes"),
    ({"allowed_schemes": ()}, "allowed_schemes"),
    ({"allowed_schemes": "http"}, "allowed_schemes"),
    ({"allowed_ports": (0,)}, "allowed_ports"),
    ({"allowed_ports": ()}, "allowed_ports"),
    ({"allowed_networks": ("not a network",)}, "allowed_networks"),
    ({"allowed_networks": ("10.0.0.1/8",)}, "allowed_networks"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"max_redirects": -1}, "max_redirects"),
    ({"max_concurrent": 0}, "max_concurrent"),
    ({"deadline_s": 0}, "deadline_s"),
    ({"deadline_s": float("inf")}, "deadline_s"),
    ({"deadline_s": float("nan")}, "deadline_s"),
    ({"max_wait_s": -1}, "max_wait_s"),
])
def test_the_policy_refuses_nonsense(fields, complaint):
    with pytest.raises(ValueError, match=complaint):
        RemoteImagePolicy(**fields)


def test_the_policy_normalises_its_fields():
    policy = RemoteImagePolicy(allowed_schemes=["HTTPS"], allowed_ports=[443], allowed_networks=["10.1.2.0/24"])
    assert policy.allowed_schemes == ("https",) and policy.allowed_ports == (443,)
    assert policy.allows_address("10.1.2.3") and not policy.allows_address("10.1.3.3")
    assert hash(policy) == hash(replace(policy))


def test_inline_replaces_only_http_image_urls(image_host, monkeypatch):
    data_url = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [
        {"role": "system", "content": "plain text"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_host.url + "/red.png"}},
            {"type": "image_url", "image_url": image_host.url.upper() + "/red.png"},
            data_url,
            {"type": "text", "text": "What colour?"},
        ]},
    ]
    fetcher = RemoteImageFetcher(LOCAL)
    inlined = fetcher.inline(messages)
    assert inlined[0] is messages[0]
    assert inlined[1]["content"] == [{"type": "image", "image": RED}] * 2 + messages[1]["content"][2:]
    monkeypatch.setattr(remote_images, "_default_fetcher", fetcher)
    assert inline_remote_images(messages) == inlined
    with pytest.raises(ImageError, match=re.escape(unreachable_text(image_host.url + "/red.png"))):
        inline_remote_images(messages, RemoteImageFetcher(RemoteImagePolicy(allowed_ports=None)))


# --------------------------------------------------------------------------- through the server


@pytest.fixture(scope="module")
def fetching_server(model, tok):
    """A server fetching under the default rules."""
    live = LiveServer(create_app(model, tok, model_id=MODEL_ID, allow_remote_images=True))
    yield live
    live.close()


@pytest.fixture(scope="module")
def local_fetching_server(model, tok):
    """A server allowed to fetch from the test image hosts."""
    live = LiveServer(create_app(model, tok, model_id=MODEL_ID, allow_remote_images=LOCAL))
    yield live
    live.close()


def ask(client, url):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What colour?"}]}]
    return client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)


def test_a_fetched_image_gives_the_same_reply_as_its_data_url(local_fetching_server, client, image_host):
    fetched = ask(local_fetching_server.client(), image_host.url + "/red.png")
    inline = ask(client, "data:image/png;base64," + base64.b64encode(RED).decode())
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens > 144
    assert fetched.choices[0].message.content == inline.choices[0].message.content


def test_fetch_failures_are_400s_that_say_nothing_about_why(fetching_server, local_fetching_server, image_host):
    url = f"http://127.0.0.1/{image_host.port}.png"
    with pytest.raises(openai.BadRequestError, match=re.escape(unreachable_text(url))):
        ask(fetching_server.client(), url)  # the default rules: loopback is off limits
    for url in (image_host.url + "/missing.png", "http://127.0.0.1:9/unreachable.png"):
        with pytest.raises(openai.BadRequestError, match=re.escape(unreachable_text(url))):
            ask(local_fetching_server.client(), url)
    with pytest.raises(openai.BadRequestError, match="may only use port 80, 443"):
        ask(fetching_server.client(), image_host.url + "/red.png")
    assert image_host.seen == [("/missing.png", f"127.0.0.1:{image_host.port}")]
