"""Fetching http(s) image URLs, only when the server was started with ``--allow-remote-images``.

Off by default: a server that fetches what clients name can be made to probe the network it sits in.
When on, each image is one GET with a timeout and a byte cap (read in pieces, so a huge or endless
response is cut at the cap rather than buffered), and the bytes replace the URL in the message so
the ordinary image checks (format, decompression-bomb size) apply to them.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from llama4.prompt import ImageError

DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
TIMEOUT_SECONDS = 10.0


def fetch_image(url: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, timeout: float = TIMEOUT_SECONDS) -> bytes:
    """The body of ``url`` (http or https), or ImageError naming what went wrong."""
    if not url.startswith(("http://", "https://")):
        raise ImageError(f"only http(s) image URLs can be fetched, got {url[:40]!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "llama4-serve"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = bytearray()
            while chunk := response.read(1 << 16):
                body += chunk
                if len(body) > max_bytes:
                    raise ImageError(f"the image at {url[:80]} is larger than {max_bytes:,} bytes")
            return bytes(body)
    except urllib.error.HTTPError as e:
        raise ImageError(f"could not fetch the image at {url[:80]}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ImageError(f"could not fetch the image at {url[:80]}: {reason}") from None


def inline_remote_images(messages: list[dict], max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> list[dict]:
    """Messages with every http(s) ``image_url`` part replaced by an image part holding the fetched bytes."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [_inline(part, max_bytes) for part in content]
            message = {**message, "content": content}
        out.append(message)
    return out


def _inline(part, max_bytes: int):
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return part
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return {"type": "image", "image": fetch_image(url, max_bytes)}
    return part
