"""What keeps web pages away from a server that has no API key: ``llama4 serve`` listens on 127.0.0.1 and
any page the user visits can send requests there.

- DNS rebinding: a page on ``evil.example`` re-points its name at 127.0.0.1 and then reads replies as
  same-origin. Its requests still say ``Host: evil.example``, so on a loopback bind only the local names pass
  (421 otherwise).
- Simple cross-origin requests: a ``text/plain``, form or multipart POST skips the CORS preflight, so
  the page could start generations without ever reading a reply. A request whose ``Origin`` is neither
  the server's own nor an allowed one may only GET or HEAD (403 otherwise), and a body must be declared
  JSON (415 otherwise). CORS is off unless origins are allowed.
- Clickjacking and content sniffing: every response says ``X-Frame-Options: DENY``, ``nosniff``,
  ``Referrer-Policy: no-referrer`` and a Content-Security-Policy (strict for the chat page, ``'none'``
  for everything else).

A pure ASGI middleware: it only edits the ``http.response.start`` message, so streamed replies (SSE) pass
through as they are written.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from llama4.serve.errors import APIError

INDEX_HTML = Path(__file__).parent / "static" / "index.html"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = ("authorization", "content-type")
CORS_MAX_AGE = "600"
API_CSP = "default-src 'none'; frame-ancestors 'none'"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name
_STYLE = re.compile(r"<style\b[^>]*>(.*?)</style\s*>", re.IGNORECASE | re.DOTALL)
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#@\s]+$")


def page_csp(index: Path = INDEX_HTML) -> str:
    """The chat page's policy: its own scripts, styles and fetches only; images also from ``data:`` (the
    previews of attached images); its inline ``<style>`` blocks allowed by hash (no ``'unsafe-inline'``)."""
    try:
        html = index.read_text(encoding="utf-8")
    except OSError:
        html = ""
    hashes = "".join(f" '{_style_hash(style)}'" for style in _STYLE.findall(html))
    return ("default-src 'self'; script-src 'self'; "
            f"style-src 'self'{hashes}; img-src 'self' data:; connect-src 'self'; object-src 'none'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def _style_hash(style: str) -> str:
    """CSP's hash of an inline block: of its text as the HTML parser sees it (line breaks as \\n)."""
    text = style.replace("\r\n", "\n").replace("\r", "\n")
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


@dataclass(frozen=True)
class GuardPolicy:
    """What :class:`BrowserGuard` lets through.

    ``allowed_hosts``: the names the ``Host`` header may carry (any port; case-insensitive); None: any
    (see :meth:`for_bind` for the default by listening address). ``allowed_origins``: the web origins
    (``scheme://host[:port]``, or ``"*"``) other than the server's own that may call it through CORS;
    none: CORS off. ``html_csp`` / ``api_csp``: the Content-Security-Policy of HTML responses / the rest.
    """

    allowed_hosts: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] = ()
    html_csp: str = field(default_factory=page_csp)
    api_csp: str = API_CSP

    def __post_init__(self):
        hosts = self.allowed_hosts
        if hosts is not None:
            hosts = None if "*" in hosts else tuple(dict.fromkeys(_host_name(h) for h in hosts))
        object.__setattr__(self, "allowed_hosts", hosts)
        object.__setattr__(self, "allowed_origins", tuple(_normal_origin(o) for o in self.allowed_origins))

    @classmethod
    def for_bind(cls, host: str, allowed_hosts: tuple[str, ...] | list[str] | None = None,
                 allowed_origins: tuple[str, ...] | list[str] = ()) -> GuardPolicy:
        """The policy of a server listening on ``host``. On a loopback address only the local names (and
        ``host`` itself) are allowed, plus ``allowed_hosts``; on 0.0.0.0 / :: or any other address, where
        the server is meant to be reached by names of its own, any Host unless ``allowed_hosts`` is given
        (then those, plus the local names or the bound address). None or empty ``allowed_hosts``: that
        default; ``"*"`` in it: any Host."""
        kind = _bind_kind(host)
        if not allowed_hosts and kind != "loopback":
            return cls(None, tuple(allowed_origins))
        own = {"loopback": (*LOOPBACK_NAMES, host), "wildcard": LOOPBACK_NAMES, "other": (host,)}[kind]
        return cls((*own, *(allowed_hosts or ())), tuple(allowed_origins))

    def host_allowed(self, host: str | None) -> bool:
        """Whether a Host header value passes; a request without one (HTTP/1.0) is not from a browser."""
        return self.allowed_hosts is None or host is None or _host_name(host) in self.allowed_hosts

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.allowed_origins or origin.lower().rstrip("/") in self.allowed_origins


def _bind_kind(host: str) -> str:
    """"loopback", "wildcard" (every interface: 0.0.0.0, ::) or "other"."""
    name = _host_name(host)
    if name == "":
        return "wildcard"
    if name == "localhost" or name.endswith(".localhost"):
        return "loopback"
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return "other"
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    if address.is_loopback or (mapped is not None and mapped.is_loopback):
        return "loopback"
    return "wildcard" if address.is_unspecified else "other"


def _host_name(host: str) -> str:
    """The name of a Host header value (or an address), without port, brackets or trailing dot, lowercase."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _normal_origin(origin: str) -> str:
    origin = origin.strip().lower().rstrip("/")
    if origin != "*" and not _ORIGIN.match(origin):
        raise ValueError(f"allowed origin {origin!r} is not an origin like 'https://example.com' or "
                         "'http://localhost:3000' (scheme, host and port only), nor '*'")
    return origin


def _origin_parts(origin: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an origin (the port filled in for http/https); None if it is not one."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, parts.hostname.rstrip("."), port if port is not None else default


def is_same_origin(origin: str, scheme: str, host: str | None) -> bool:
    """Whether ``Origin`` names this server as the client reached it: the request's scheme and Host."""
    if host is None:
        return False
    ours = _origin_parts(f"{scheme}://{host.strip()}")
    return ours is not None and _origin_parts(origin.strip().lower()) == ours


def is_json_type(content_type: str | None) -> bool:
    """``application/json`` or a ``+json`` type, with any parameters. A missing Content-Type passes:
    curl without ``-d`` and some SDKs send none, while the bodies a page can send cross-origin without a
    preflight all carry one (``text/plain``, ``application/x-www-form-urlencoded``, ``multipart/form-data``).
    The only browser bodies without one (a ``fetch`` of a Blob or ArrayBuffer) come with an ``Origin``
    header, which the origin check handles."""
    if content_type is None:
        return True
    kind, _, subtype = content_type.partition(";")[0].strip().lower().partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def host_refused(host: str) -> APIError:
    return APIError(421, f"this server does not answer to the Host {host!r} (a guard against DNS rebinding); "
                         f"to reach it by that name, start it with --allowed-hosts {_host_name(host) or host}",
                    code="host_not_allowed")


def origin_refused(origin: str) -> APIError:
    return APIError(403, f"cross-origin request from {origin!r} refused: this server takes requests other than "
                         "GET from its own web page only; to let that page call it, start the server with "
                         f"--allowed-origins {origin}", "permission_error", code="origin_not_allowed")


def unsupported_media_type(content_type: str) -> APIError:
    return APIError(415, f"unsupported Content-Type {content_type!r}: send the body as JSON with "
                         "'Content-Type: application/json' (curl: -H 'Content-Type: application/json')",
                    param="Content-Type", code="unsupported_media_type")


class BrowserGuard:
    """ASGI middleware: checks Host, Origin and Content-Type of each HTTP request before the app sees it,
    answers CORS preflights for allowed origins, and adds the security (and CORS) headers to every response.
    Other scopes (lifespan, websocket) pass through untouched."""

    def __init__(self, app, policy: GuardPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _request_headers(scope)
        origin = headers.get("origin")
        cors = origin is not None and self.policy.origin_allowed(origin)
        send = self._sending(send, origin if cors else None)
        refusal = self._refusal(scope, headers, origin, cors)
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        if cors and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return await _preflight(send, headers.get("access-control-request-headers", ""))
        await self.app(scope, receive, send)

    def _refusal(self, scope, headers: dict[str, str], origin: str | None, cors: bool) -> APIError | None:
        host, method = headers.get("host"), scope["method"]
        if not self.policy.host_allowed(host):
            return host_refused(host)
        if (origin is not None and not cors and method not in SAFE_METHODS
                and not is_same_origin(origin, scope.get("scheme", "http"), host)):
            return origin_refused(origin)
        if method in BODY_METHODS and not is_json_type(headers.get("content-type")):
            return unsupported_media_type(headers["content-type"])
        return None

    def _sending(self, send, cors_origin: str | None):
        """``send``, adding our headers to the response's start message (nothing else is touched)."""
        policy = self.policy

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": _response_headers(list(message.get("headers", [])), policy,
                                                                   cors_origin)}
            await send(message)

        return send_with_headers


def _request_headers(scope) -> dict[str, str]:
    """The request's headers by lowercase name; the first of repeated ones."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _response_headers(headers: list[tuple[bytes, bytes]], policy: GuardPolicy,
                      cors_origin: str | None) -> list[tuple[bytes, bytes]]:
    """``headers`` plus the security headers it lacks (and, for an allowed origin, the CORS ones)."""
    present = {name.lower(): i for i, (name, _) in reversed(list(enumerate(headers)))}
    content_type = headers[present[b"content-type"]][1].decode("latin-1") if b"content-type" in present else ""
    html = content_type.lower().startswith("text/html")
    ours = [(b"x-content-type-options", "nosniff"), (b"x-frame-options", "DENY"),
            (b"referrer-policy", "no-referrer"),
            (b"content-security-policy", policy.html_csp if html else policy.api_csp)]
    if cors_origin is not None:
        ours.append((b"access-control-allow-origin", cors_origin))
    out = headers + [(name, value.encode("latin-1")) for name, value in ours if name not in present]
    return _vary_origin(out, present.get(b"vary")) if policy.allowed_origins else out


def _vary_origin(headers: list[tuple[bytes, bytes]], index: int | None) -> list[tuple[bytes, bytes]]:
    """With CORS on, replies differ by Origin: say so in ``Vary`` (merged into one already there)."""
    if index is None:
        return headers + [(b"vary", b"Origin")]
    name, value = headers[index]
    names = {v.strip().lower() for v in value.split(b",")}
    if b"origin" in names or b"*" in names:
        return headers
    headers = list(headers)
    headers[index] = (name, value + b", Origin")
    return headers


async def _preflight(send, requested: str) -> None:
    """204 for an allowed origin's preflight (the origin itself and Vary are added by the caller's ``send``)."""
    wanted = [h.strip().lower() for h in requested.split(",") if _TOKEN.match(h.strip())]
    allow = ", ".join(dict.fromkeys([*CORS_HEADERS, *wanted]))
    headers = [(b"access-control-allow-methods", CORS_METHODS.encode()),
               (b"access-control-allow-headers", allow.encode("latin-1")),
               (b"access-control-max-age", CORS_MAX_AGE.encode())]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
