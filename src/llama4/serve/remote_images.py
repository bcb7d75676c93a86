"""Fetching http(s) image URLs, only when the server was started with ``--allow-remote-images``.

A server that fetches the URLs its clients name is a proxy into the network it sits in (server-side request
forgery: cloud metadata at 169.254.169.254, admin ports on loopback, hosts on the private network). So:

* The host is resolved here and every address it resolves to must be public (unless the policy says
  otherwise); the connection goes to the checked address, never to the name again, so a DNS answer that
  changes between check and connect (DNS rebinding) cannot slip a private address in. The Host header, TLS
  SNI and certificate check use the name. Redirects are followed by hand, every hop checked the same way.
* Only http and https on ports 80 and 443 by default, and no ``user:password@`` in the URL.
* One deadline bounds the whole fetch (lookup, connect, TLS, every read, every redirect): a per-read timeout
  would let a server that trickles a byte at a time hold a request for ever. A byte cap bounds the body, and a
  semaphore the fetches in flight across the server, so slow fetches cannot pile up and starve it.
* Every failure that depends on the network reads the same to the client (the reason goes to the debug log),
  so the error texts cannot be used to scan ports or map hosts. Only a URL that breaks a rule on its face
  (scheme, port, credentials) gets an error naming the rule.

The fetched bytes replace the URL in the message, so the ordinary image checks (format, decompression-bomb
size) apply to them.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from llama4.prompt import ImageError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SocketAddress = tuple[int, tuple]  # (address family, socket address) as getaddrinfo gives them

DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
BUSY_TEXT = "too many image fetches in progress; retry later"

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_:")
_PATH_SAFE_CHARS = "!$%&'()*+,/:;=?@[]~"
_CARRIER_GRADE_NAT = ipaddress.IPv4Network("100.64.0.0/10")
_READ_SIZE = 1 << 16


def unreachable_text(url: str) -> str:
    """The one error text for every fetch that failed because of the remote side or the network."""
    return (f"could not fetch the image at {url[:80]}: it is not reachable, not allowed, "
            "or not an image this server may fetch")


@dataclass(frozen=True)
class RemoteImagePolicy:
    """What the server may fetch, how long it may take and how much it may bring back; the defaults are safe.

    ``allowed_ports``: None allows any port. ``allow_private``: also fetch from loopback, private, link-local and
    other non-public addresses (for a server on a trusted network only). ``allowed_networks``: networks fetched
    from even though not public, e.g. ``("10.1.2.0/24",)`` for an internal image host. ``deadline_s`` bounds
    the whole of one fetch, redirects included. ``max_concurrent``: fetches in flight across the server;
    ``max_wait_s``: how long a fetch waits for one of those slots.
    """

    allowed_schemes: tuple[str, ...] = ("http", "https")
    allowed_ports: tuple[int, ...] | None = (80, 443)
    allow_private: bool = False
    allowed_networks: tuple[str | IPNetwork, ...] = ()
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    deadline_s: float = 10.0
    max_redirects: int = 3
    max_concurrent: int = 4
    max_wait_s: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_schemes", _valid_schemes(self.allowed_schemes))
        object.__setattr__(self, "allowed_ports", _valid_ports(self.allowed_ports))
        object.__setattr__(self, "allowed_networks", _valid_networks(self.allowed_networks))
        _require_int("max_bytes", self.max_bytes, 1)
        _require_int("max_redirects", self.max_redirects, 0)
        _require_int("max_concurrent", self.max_concurrent, 1)
        _require_seconds("deadline_s", self.deadline_s, zero_ok=False)
        _require_seconds("max_wait_s", self.max_wait_s, zero_ok=True)

    def allows_address(self, address: str | IPAddress) -> bool:
        """Whether the server may connect to ``address`` (an address already resolved, never a name)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        ip = _as_ipv4_if_mapped(ip)
        if any(ip in network for network in self.allowed_networks):
            return True
        return self.allow_private or _is_public(ip)


def _valid_schemes(schemes) -> tuple[str, ...]:
    valid = tuple(str(s).lower() for s in schemes) if not isinstance(schemes, str) else ()
    if not valid or not set(valid) <= set(_DEFAULT_PORTS):
        raise ValueError(f"allowed_schemes must be one or both of 'http', 'https', got {schemes!r}")
    return valid


def _valid_ports(ports) -> tuple[int, ...] | None:
    if ports is None:
        return None
    valid = tuple(ports)
    if not valid or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in valid):
        raise ValueError(f"allowed_ports must be None (any) or port numbers from 1 to 65535, got {ports!r}")
    return valid


def _valid_networks(networks) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(n) for n in networks)
    except (TypeError, ValueError) as e:
        raise ValueError(f"allowed_networks must be networks such as '10.1.2.0/24': {e}") from None


def _require_int(name: str, value, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")


def _require_seconds(name: str, value, zero_ok: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0 <= value < float("inf")) or (value == 0 and not zero_ok):
        kind = "zero or more" if zero_ok else "more than zero"
        raise ValueError(f"{name} must be a finite number of seconds, {kind}, got {value!r}")


def _as_ipv4_if_mapped(ip: IPAddress) -> IPAddress:
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip


def _is_public(ip: IPAddress) -> bool:
    ip = _as_ipv4_if_mapped(ip)
    if ip.version == 6 and ip.sixtofour is not None and not _is_public(ip.sixtofour):
        return False
    special = (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
               or ip.is_unspecified or ip in _CARRIER_GRADE_NAT or (ip.version == 6 and ip.is_site_local))
    return ip.is_global and not special


class _Refused(Exception):
    """A fetch that failed; the text is for the debug log only."""


class _BrokenRule(_Refused):
    """A URL that breaks a rule on its face; the text names the rule and may be shown to the client."""


@dataclass(frozen=True)
class _Target:
    """A URL that passed the rules about URLs, in the pieces a request is made of."""

    url: str
    scheme: str
    host: str  # ASCII: an IDNA-encoded name, or an IP address without brackets
    port: int
    path: str  # the request target: path and query, percent-encoded

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def request(self) -> bytes:
        lines = (f"GET {self.path} HTTP/1.1", f"Host: {self.host_header}", "User-Agent: llama4-serve",
                 "Accept: image/*", "Accept-Encoding: identity", "Connection: close", "", "")
        return "\r\n".join(lines).encode("ascii")


def _target(url: str, policy: RemoteImagePolicy) -> _Target:
    """``url`` checked against the rules about URLs themselves, or _BrokenRule naming the rule."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _BrokenRule(f"the image URL {url[:40]!r} is malformed") from None
    scheme = parts.scheme.lower()
    if scheme not in policy.allowed_schemes:
        raise _BrokenRule(f"only {' or '.join(policy.allowed_schemes)} image URLs can be fetched, got {url[:40]!r}")
    if parts.username is not None or parts.password is not None:
        raise _BrokenRule("image URLs must not carry a user name or password")
    port = _port(parts, scheme)
    if policy.allowed_ports is not None and port not in policy.allowed_ports:
        allowed = ", ".join(map(str, policy.allowed_ports))
        raise _BrokenRule(f"image URLs may only use port {allowed}, got {port}")
    path = quote(parts.path or "/", safe=_PATH_SAFE_CHARS)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PATH_SAFE_CHARS)
    return _Target(url, scheme, _ascii_host(parts.hostname), port, path)


def _port(parts, scheme: str) -> int:
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise _BrokenRule("the image URL's port must be a number from 1 to 65535")
    return _DEFAULT_PORTS[scheme] if port is None else port


def _ascii_host(hostname: str | None) -> str:
    if not hostname:
        raise _BrokenRule("the image URL has no host name")
    if not hostname.isascii():
        try:
            hostname = hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise _BrokenRule("the image URL's host name is not a valid internationalised domain name") from None
    if not set(hostname) <= _HOST_CHARS or (":" in hostname and not _is_ipv6_literal(hostname)):
        raise _BrokenRule("the image URL's host name has characters a host name cannot have")
    return hostname


def _is_ipv6_literal(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the fetch ran past its deadline")
    return left


def _resolve(host: str, port: int, deadline: float) -> list[SocketAddress]:
    """The TCP addresses ``host`` resolves to, looked up within the time left (getaddrinfo has no timeout)."""
    answer: list = []

    def look_up() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as e:  # handed to the caller, which refuses the fetch
            answer.append(e)

    lookup = threading.Thread(target=look_up, name="remote-image-lookup", daemon=True)
    lookup.start()
    lookup.join(_time_left(deadline))
    if not answer:
        raise _Refused(f"the lookup of {host} ran past the deadline")
    if isinstance(answer[0], Exception):
        raise _Refused(f"the lookup of {host} failed: {answer[0]!r}")
    return [(family, address) for family, _, _, _, address in answer[0]
            if family in (socket.AF_INET, socket.AF_INET6)]


def _allowed(addresses: list[SocketAddress], policy: RemoteImagePolicy) -> list[SocketAddress]:
    if not addresses:
        raise _Refused("the host resolved to no address")
    for _, address in addresses:
        if not policy.allows_address(address[0]):
            raise _Refused(f"{address[0]} is not an address this server may fetch from")
    return addresses


def _connect(addresses: list[SocketAddress], deadline: float) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that answers within the time left."""
    failure: OSError | None = None
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_time_left(deadline))
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            failure = e
    raise failure or _Refused("no address to connect to")


class _DeadlineReader(io.RawIOBase):
    """The socket's bytes, each receive bounded by the time left, so no pace of sending outlasts the deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(_time_left(self._deadline))
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """The one thing http.client.HTTPResponse asks of a socket: a file to read from, here a deadline-bound one."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    declared = response.length
    if declared is not None and declared > max_bytes:
        raise _Refused(f"the Content-Length {declared} is over the cap of {max_bytes} bytes")
    body = bytearray()
    while chunk := response.read1(_READ_SIZE):
        body += chunk
        if len(body) > max_bytes:
            raise _Refused(f"the body is over the cap of {max_bytes} bytes")
    if declared is not None and len(body) != declared:
        raise _Refused(f"the body ended after {len(body)} of its {declared} bytes")
    return bytes(body)


def _reason(error: Exception) -> str:
    return str(error) if isinstance(error, _Refused) else f"{type(error).__name__}: {error}"


class RemoteImageFetcher:
    """Fetches image URLs under one policy, at most ``policy.max_concurrent`` at a time across all its callers."""

    def __init__(self, policy: RemoteImagePolicy = RemoteImagePolicy()) -> None:
        self.policy = policy
        self._slots = threading.BoundedSemaphore(policy.max_concurrent)
        self._tls_lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None

    def fetch(self, url: str) -> bytes:
        """The body of ``url``, or ImageError: naming the rule for a URL that breaks one, the same text otherwise."""
        try:
            target = _target(url, self.policy)
        except _BrokenRule as e:
            raise ImageError(str(e)) from None
        if not self._slots.acquire(timeout=self.policy.max_wait_s):
            log.debug("no fetch slot for %s within %s s", url, self.policy.max_wait_s)
            raise ImageError(BUSY_TEXT)
        try:
            return self._follow(target, time.monotonic() + self.policy.deadline_s)
        except (_Refused, OSError, ValueError, http.client.HTTPException) as e:
            log.debug("could not fetch %s: %s", url, _reason(e))
            raise ImageError(unreachable_text(url)) from None
        finally:
            self._slots.release()

    def inline(self, messages: list[dict]) -> list[dict]:
        """``messages`` with every http(s) ``image_url`` part replaced by an image part holding the fetched bytes."""
        return [self._inline_message(message) for message in messages]

    def _inline_message(self, message: dict) -> dict:
        content = message.get("content")
        if not isinstance(content, list):
            return message
        return {**message, "content": [self._inline_part(part) for part in content]}

    def _inline_part(self, part):
        url = _remote_image_url(part)
        return part if url is None else {"type": "image", "image": self.fetch(url)}

    def _follow(self, target: _Target, deadline: float) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            with self._response(target, deadline) as response:
                if response.status in _REDIRECT_STATUSES:
                    target = _target(urljoin(target.url, _location(response)), self.policy)
                    continue
                if response.status != 200:
                    raise _Refused(f"HTTP {response.status} from {target.url}")
                return _read_body(response, self.policy.max_bytes)
        raise _Refused(f"more than {self.policy.max_redirects} redirects")

    @contextmanager
    def _response(self, target: _Target, deadline: float) -> Iterator[http.client.HTTPResponse]:
        with self._connection(target, deadline) as sock:
            sock.settimeout(_time_left(deadline))
            sock.sendall(target.request())
            response = http.client.HTTPResponse(_DeadlineSocket(sock, deadline), method="GET")
            try:
                response.begin()
                yield response
            finally:
                response.close()

    @contextmanager
    def _connection(self, target: _Target, deadline: float) -> Iterator[socket.socket]:
        addresses = _allowed(_resolve(target.host, target.port, deadline), self.policy)
        sock = _connect(addresses, deadline)
        try:
            if target.scheme == "https":
                sock.settimeout(_time_left(deadline))
                sock = self._tls_context().wrap_socket(sock, server_hostname=target.host)
            yield sock
        finally:
            sock.close()

    def _tls_context(self) -> ssl.SSLContext:
        with self._tls_lock:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            return self._tls


def _location(response: http.client.HTTPResponse) -> str:
    location = response.getheader("Location")
    if not location:
        raise _Refused(f"HTTP {response.status} without a Location")
    return location.strip()


def _remote_image_url(part) -> str | None:
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return None
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    return url if isinstance(url, str) and url.lower().startswith(("http://", "https://")) else None


_default_fetcher = RemoteImageFetcher()


def fetch_image(url: str, policy: RemoteImagePolicy = RemoteImagePolicy()) -> bytes:
    """The body of ``url`` under ``policy`` (see RemoteImageFetcher.fetch); the default policy shares its slots."""
    fetcher = _default_fetcher if policy == _default_fetcher.policy else RemoteImageFetcher(policy)
    return fetcher.fetch(url)


def inline_remote_images(messages: list[dict], fetcher: RemoteImageFetcher | None = None) -> list[dict]:
    """``messages`` with their http(s) image URLs fetched (see RemoteImageFetcher.inline), by default under the
    default policy and its server-wide bound on concurrent fetches."""
    return (fetcher or _default_fetcher).inline(messages)
