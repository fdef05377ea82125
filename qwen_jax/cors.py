"""Cross-origin requests (CORS): which web pages may call the API from a browser.

A browser lets a page from one origin (`scheme://host:port`) read a response from another only
when the response names that origin in `Access-Control-Allow-Origin`. Before a POST with a JSON
body or an `Authorization` header it first asks with an OPTIONS "preflight" request, and sends
the real request only if the answer allows it.

vLLM allows every origin. Here the default is pages served from this machine (`localhost`,
`127.0.0.1`, `[::1]`, any port), so a chat page on localhost works while an arbitrary website open
in the same browser cannot drive the local model; `qwen-jax serve --allowed-origins` widens the
list (`*` for any origin, as vLLM). Pure functions: the server asks, these answer with headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOCAL = "local"  # the list entry that stands for every origin on this machine
ANY = "*"
_LOCAL_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?$")
_ORIGIN = re.compile(r"^(https?://(\[[0-9a-f:.]+\]|[^/\s:\[\]]+)(:\d{1,5})?|null)$")
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")
ALLOWED_METHODS = "GET, POST, OPTIONS"
PREFLIGHT_MAX_AGE_S = 600


@dataclass(frozen=True)
class CorsPolicy:
    """The origins allowed to read responses: "local", "*", or exact origins."""

    origins: tuple[str, ...] = (LOCAL,)

    def allows(self, origin: str) -> bool:
        origin = origin.lower()
        return (ANY in self.origins or origin in self.origins
                or (LOCAL in self.origins and bool(_LOCAL_ORIGIN.match(origin))))

    def response_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """Headers for any response to a request that came with `Origin: origin`."""
        if origin is None or not self.allows(origin):
            return []  # no header: the browser keeps the response from the page
        # A page's script sees only the "simple" response headers unless told of others.
        expose = ("Access-Control-Expose-Headers", "X-Request-Id")
        if ANY in self.origins:
            return [("Access-Control-Allow-Origin", "*"), expose]
        # Named back, so a cache must keep one copy per origin.
        return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"), expose]

    def preflight_headers(self, origin: str, requested_headers: str | None
                          ) -> list[tuple[str, str]] | None:
        """A preflight answer's headers besides `response_headers`, or None when `origin` is not
        allowed."""
        if not self.allows(origin):
            return None
        headers = [
            ("Access-Control-Allow-Methods", ALLOWED_METHODS),
            ("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE_S)),
        ]
        requested = (requested_headers or "").strip()
        if requested and _HEADER_LIST.match(requested):
            # Whatever headers the page wants to send (Authorization, Content-Type, the OpenAI
            # SDK's x-stainless-*): the API reads only the ones it knows.
            headers.append(("Access-Control-Allow-Headers", requested))
        return headers


def parse_origins(text: str) -> CorsPolicy:
    """`--allowed-origins` (comma-separated: `local`, `*`, `null` or `scheme://host[:port]`)."""
    items = [item.strip().lower().rstrip("/") for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("--allowed-origins needs at least one origin (or 'local', or '*')")
    for item in items:
        if item not in (LOCAL, ANY) and not _ORIGIN.match(item):
            raise ValueError(
                f"--allowed-origins: {item!r} is not an origin (scheme://host[:port], e.g. "
                "http://192.168.1.5:3000), 'local' or '*'"
            )
    return CorsPolicy(tuple(dict.fromkeys(items)))
