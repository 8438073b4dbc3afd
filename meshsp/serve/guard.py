"""Checks every HTTP request must pass before the server reads its body: API key, content type, size.

``Guard`` is ASGI middleware around the server's app. A request that fails a check is answered at
once, in OpenAI's error format, and never reaches the app (or the GPUs). The checks, in this order:

1. **API key** (401): with ``api_key`` set, every path but ``open_paths`` (``/health``, for load
   balancers) needs ``Authorization: Bearer <key>``, as OpenAI's and vLLM's clients send it.
2. **Content type** (415): a POST, PUT or PATCH body must be ``application/json`` (UTF-8). A browser
   sends ``text/plain`` and form bodies to any origin without a CORS preflight; accepting them would
   let any web page a user opens spend the GPUs.
3. **Size** (413): a ``content-length`` above ``max_body_bytes`` is refused without reading the body;
   a body without one (chunked) is read up to the limit, refused past it, and otherwise replayed to
   the app. A malformed ``content-length`` is a 400.

The guard is a plain ASGI class, not Starlette's ``BaseHTTPMiddleware``, which runs the app behind
streams of its own and has kept the client's ``http.disconnect`` from it: the server drops a queued
request whose client left, so the app must see that message.

``meshsp.serve.create_app`` puts it around the server's app (``--api-key``, ``--max-body-bytes``);
around any other ASGI app it works the same.

Example::

    app = Guard(my_asgi_app, api_key=api_key_from(args.api_key), max_body_bytes=1_048_576,
                on_reject=lambda reason: rejected.labels(reason=reason).inc())
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ENV_API_KEY", "MIN_KEY_LENGTH", "REASONS", "Guard", "api_key_from"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

ENV_API_KEY = "MESHSP_API_KEY"
MIN_KEY_LENGTH = 8
# What ``on_reject`` is called with, one per rejected request.
REASONS = ("unauthorized", "unsupported_media_type", "too_large", "bad_content_length")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_HOW_TO_AUTH = "send 'Authorization: Bearer <key>' with the server's API key"
_MAX_LENGTH_DIGITS = 20  # 10**20 bytes is past any real body: a longer number is garbage, not a size
_ECHO_LIMIT = 100  # characters of a client's header quoted back in an error


@dataclass(frozen=True)
class _Rejection:
    status: int
    reason: str  # one of REASONS
    message: str
    code: str | None = None


class _ClientLeft(Exception):
    """The client disconnected before its body arrived; nobody is left to answer."""


class Guard:
    """ASGI middleware that answers 401, 415, 413 or 400 for requests the app must not see.

    ``max_body_bytes``: the largest body accepted (a body of exactly this size passes).
    ``api_key``: when set, the bearer token every path outside ``open_paths`` needs.
    ``on_reject``: called with the reason (one of ``REASONS``) once per rejected request.

    Example::

        guarded = Guard(app, api_key="s3cret-key", on_reject=print)
        # POST /v1/images/generations without the key -> 401, and print("unauthorized")
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = 1_048_576, api_key: str | None = None,
                 open_paths: frozenset[str] = frozenset({"/health"}),
                 on_reject: Callable[[str], None] | None = None) -> None:
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={max_body_bytes!r}; pass a positive number of bytes "
                             f"(the default is 1_048_576, 1 MiB).")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._key = None if api_key is None else _checked_key(api_key, "api_key").encode()
        self.open_paths = frozenset(open_paths)
        self.on_reject = on_reject

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan and websocket pass through untouched
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        rejection = (self._authorize(scope["path"], headers) or _check_media_type(scope["method"], headers)
                     or self._check_length(headers))
        if rejection is None and ("content-length" not in headers or "transfer-encoding" in headers):
            # No length to trust (with transfer-encoding the server frames the body by its chunks and
            # ignores content-length, RFC 9112 6.3): read the body here, up to the limit, and replay it.
            try:
                body = await _read_body(receive, self.max_body_bytes)
            except _ClientLeft:
                return
            if body is None:
                rejection = _too_large(f"the request body is larger than this server's limit of "
                                       f"{self.max_body_bytes} bytes; send a smaller body.")
            else:
                receive = _replay(body, receive)
        if rejection is not None:
            await self._reject(rejection, scope, send)
            return
        await self.app(scope, receive, send)

    def _authorize(self, path: str, headers: dict[str, list[bytes]]) -> _Rejection | None:
        if self._key is None or path in self.open_paths:
            return None
        values = headers.get("authorization", [])
        if not values:
            return _unauthorized(f"missing API key: {_HOW_TO_AUTH}.")
        if len(values) > 1:
            return _unauthorized(f"the request has {len(values)} Authorization headers: {_HOW_TO_AUTH}, once.")
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return _unauthorized(f"the Authorization header is not a bearer token: {_HOW_TO_AUTH}.")
        if not secrets.compare_digest(token.strip(), self._key):
            return _unauthorized(f"incorrect API key: {_HOW_TO_AUTH}.")
        return None

    def _check_length(self, headers: dict[str, list[bytes]]) -> _Rejection | None:
        values = set(headers.get("content-length", []))
        if not values:
            return None
        if len(values) > 1:
            return _bad_length(f"the request has conflicting content-length headers {_quote(b', '.join(values))}; "
                               f"send one.")
        value = values.pop().strip()
        if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
            return _bad_length(f"invalid content-length {_quote(value)}: it must be a whole number of bytes "
                               f"(at most {_MAX_LENGTH_DIGITS} digits).")
        if int(value) > self.max_body_bytes:
            return _too_large(f"the request body is {int(value)} bytes (content-length); this server accepts at "
                              f"most {self.max_body_bytes} bytes. Send a smaller body.")
        return None

    async def _reject(self, rejection: _Rejection, scope: MutableMapping[str, Any], send: Send) -> None:
        if self.on_reject is not None:
            self.on_reject(rejection.reason)
        error = {"message": rejection.message, "type": "invalid_request_error", "param": None, "code": rejection.code}
        body = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if scope.get("http_version", "1.1").startswith("1"):
            # The body is left unread (maybe 100 GB of it), so the connection cannot carry another
            # request. HTTP/2 forbids the header (RFC 9113 8.2.2); a stream ends on its own there.
            headers.append((b"connection", b"close"))
        if rejection.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": rejection.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def api_key_from(flag: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    """The server's API key: the ``--api-key`` flag's, else ``MESHSP_API_KEY``'s, else None (no key).

    A key that is blank, shorter than ``MIN_KEY_LENGTH`` or not sendable in an HTTP header is a
    ``ValueError``: a set but unusable key must not quietly leave the server open.

    Example::

        api_key_from("k3y-0f-my-own")                           # "k3y-0f-my-own"
        api_key_from(None, {"MESHSP_API_KEY": "k3y-0f-my-own"})  # "k3y-0f-my-own"
        api_key_from(None, {})                                  # None
    """
    if flag is not None:
        return _checked_key(flag, "--api-key")
    if ENV_API_KEY in env:
        return _checked_key(env[ENV_API_KEY], ENV_API_KEY)
    return None


def _checked_key(key: str, source: str) -> str:
    fix = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if not key.strip():
        raise ValueError(f"the API key from {source} is empty or blank ({len(key)} characters); {fix}.")
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"the API key from {source} is {len(key)} characters; use at least {MIN_KEY_LENGTH}: {fix}.")
    bad = next((i for i, c in enumerate(key) if not "!" <= c <= "~"), None)
    if bad is not None:
        raise ValueError(f"the API key from {source} has a space or a character that is not printable ASCII at "
                         f"position {bad}; clients send it in an HTTP header, where it cannot travel: {fix}.")
    return key


def _headers(scope: MutableMapping[str, Any]) -> dict[str, list[bytes]]:
    """Header values by lower-case name (ASGI servers already lower-case them; test clients may not)."""
    headers: dict[str, list[bytes]] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.decode("latin-1").lower(), []).append(value)
    return headers


def _check_media_type(method: str, headers: dict[str, list[bytes]]) -> _Rejection | None:
    if method.upper() not in _BODY_METHODS:
        return None
    # Browsers send text/plain, urlencoded and multipart bodies cross-origin without a CORS preflight:
    # accepting them would let any web page a user opens spend the GPUs. JSON needs a preflight.
    values = headers.get("content-type", [])
    need = "send 'Content-Type: application/json' with a UTF-8 JSON body"
    if len(values) != 1:
        sent = "no content-type" if not values else f"{len(values)} content-type headers"
        return _unsupported(f"the request has {sent}; {need}.")
    media_type, *params = values[0].decode("latin-1").split(";")
    if media_type.strip().lower() != "application/json":
        return _unsupported(f"unsupported content-type {_quote(values[0])}; {need}.")
    for param in params:
        name, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset != "utf-8":
            return _unsupported(f"unsupported charset {_quote(charset.encode())} in content-type "
                                f"{_quote(values[0])}; {need}.")
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body from ``receive``, or None as soon as more than ``limit`` bytes arrived."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientLeft
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the buffered body as one message, then the server's own
    messages (so ``http.disconnect`` still reaches the app)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _quote(value: bytes) -> str:
    text = value.decode("latin-1")
    return repr(text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + "...")


def _unauthorized(message: str) -> _Rejection:
    return _Rejection(401, "unauthorized", message, code="invalid_api_key")


def _unsupported(message: str) -> _Rejection:
    return _Rejection(415, "unsupported_media_type", message)


def _too_large(message: str) -> _Rejection:
    return _Rejection(413, "too_large", message)


def _bad_length(message: str) -> _Rejection:
    return _Rejection(400, "bad_content_length", message)
