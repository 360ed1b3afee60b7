"""Optional API-key authentication of the HTTP API, OpenAI style: ``Authorization: Bearer <key>``.

Keys come from a file (``ingress.api_keys_file``: one key per line, blank lines and ``#``
comments ignored) and/or an environment variable of the ingress replicas
(``ingress.api_keys_env``: comma-separated keys). With neither configured there is no
authentication. A configured source that is missing, unreadable or holds no key is a start-up
error: authentication that was asked for never silently turns itself off.

The keys never enter the application's configuration (Serve shows that in its status and
dashboard) nor any log or error message: only their SHA-256 digests are kept. A presented key is
hashed and compared with every configured digest by ``hmac.compare_digest``, always all of them,
so the time taken does not depend on which key matched, how much of it matched, or its length.

Every route but the open ones (``GET /health``, for load balancers) needs a key; a missing,
malformed and wrong key get the same 401 (OpenAI-style body, ``WWW-Authenticate: Bearer``), which
does not say which it was.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterable, Mapping

from serving.errors import APIError

OPEN_PATHS = frozenset({"/health"})


class AuthConfigError(ValueError):
    """API-key authentication is configured but gives no usable key."""


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer <key>`",
                    "invalid_request_error", None, "invalid_api_key")


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _usable(key: str) -> bool:
    """A key that can travel in an HTTP header as a bearer token: visible ASCII, no spaces."""
    return bool(key) and key.isascii() and key.isprintable() and not any(c.isspace() for c in key)


class APIKeys:
    """A set of API keys, held as digests; ``check`` is constant-time over the whole set."""

    def __init__(self, keys: Iterable[str]) -> None:
        digests = []
        for key in keys:
            if not _usable(key):
                raise AuthConfigError("an API key must be visible ASCII characters without spaces")
            digests.append(_digest(key.encode("ascii")))
        if not digests:
            raise AuthConfigError("no API keys given")
        self._digests = tuple(dict.fromkeys(digests))     # duplicates dropped, order kept

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:                  # never the keys
        return f"APIKeys({len(self)} keys)"

    def check(self, presented: str | bytes | None) -> bool:
        """True when `presented` is one of the keys. The work done is the same for a missing,
        wrong or right key: one hash, then a comparison with every key (no early exit)."""
        if isinstance(presented, str):
            presented = presented.encode("utf-8", "surrogateescape")
        given = _digest(presented or b"")
        match = False
        for d in self._digests:
            match |= hmac.compare_digest(given, d)
        return match and bool(presented)

    def check_authorization(self, values: list[bytes]) -> bool:
        """Check the ``Authorization`` header values of a request: exactly one, ``Bearer <key>``
        (the scheme in any case)."""
        token = None
        if len(values) == 1:
            scheme, _, rest = values[0].strip().partition(b" ")
            if scheme.lower() == b"bearer":
                token = rest.strip()
        return self.check(token)


def parse_key_file(text: str) -> list[str]:
    """The keys of a key file: one per line; blank lines and ``#`` comments (whole lines, or after
    whitespace at a line's end) are ignored."""
    keys = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].split("\t#", 1)[0].strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


def load_api_keys(file: str | None, env: str | None, environ: Mapping[str, str] | None = None) -> APIKeys | None:
    """The configured keys (None: authentication off). Raises AuthConfigError naming the source
    (never a key) when a configured source is missing, unreadable, empty or holds a bad key."""
    if not file and not env:
        return None
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    if file:
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise AuthConfigError(f"ingress.api_keys_file {file!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(f"ingress.api_keys_file {file!r} cannot be read ({type(exc).__name__})") from None
        found = parse_key_file(text)
        if not found:
            raise AuthConfigError(f"ingress.api_keys_file {file!r} holds no API key (one per line; '#' comments)")
        bad = [i for i, k in enumerate(found, 1) if not _usable(k)]
        if bad:
            raise AuthConfigError(f"ingress.api_keys_file {file!r}: key #{bad[0]} has spaces or non-ASCII "
                                  f"characters")
        keys += found
    if env:
        value = environ.get(env)
        if value is None:
            raise AuthConfigError(f"ingress.api_keys_env: the environment variable {env} is not set")
        found = [k.strip() for k in value.split(",") if k.strip()]
        if not found:
            raise AuthConfigError(f"ingress.api_keys_env: the environment variable {env} holds no API key "
                                  f"(comma-separated)")
        bad = [i for i, k in enumerate(found, 1) if not _usable(k)]
        if bad:
            raise AuthConfigError(f"ingress.api_keys_env: key #{bad[0]} in {env} has spaces or non-ASCII characters")
        keys += found
    return APIKeys(keys)


def route_path(scope: dict) -> str:
    """The request path below the application's route prefix (Serve passes it as root_path)."""
    path, root = scope.get("path") or "/", scope.get("root_path") or ""
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        path = path[len(root):] or "/"
    return path


class APIKeyMiddleware:
    """ASGI middleware: an HTTP request to any path but `open_paths` needs a valid key.

    `keys` is called per request and returns the replica's APIKeys, or None when authentication
    is off; if it raises, the request is refused with a 503 (fail closed). Other scopes
    (lifespan; websockets, which the app does not serve) pass through.
    """

    def __init__(self, app, keys: Callable[[], APIKeys | None], open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            keys = self.keys()
        except Exception:
            return await _send_error(send, APIError(503, "the server is not ready", "server_error", None,
                                                    "unavailable", 1))
        if keys is None or route_path(scope) in self.open_paths:
            return await self.app(scope, receive, send)
        values = [v for k, v in scope.get("headers") or () if k.lower() == b"authorization"]
        if keys.check_authorization(values):
            return await self.app(scope, receive, send)
        await _send_error(send, unauthorized(), {"WWW-Authenticate": "Bearer"})


async def _send_error(send, err: APIError, extra: dict | None = None) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in {**err.headers(), **(extra or {})}.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
