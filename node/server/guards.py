"""The node's guards, written once for every protocol: the API key, the request-size limit and the
admission gate; the ASGI middleware that applies the first two in front of the A2A routes; and
`json_only`, the content-type check in front of the A2A endpoints that take a body.

The HTTP APIs (`node.anthropic`, `node.openai`) call `require_key`, `read_body` and
`RequestGate` themselves so that a refusal reaches their clients in the shape those clients parse;
each maps the refusals below onto its own errors:

    Refused                 (status: the HTTP status both APIs answer with)
    ├── Unauthorized        401: no key, or a wrong one
    ├── BodyTooLarge        413: the body exceeds `max_message_bytes`
    ├── NotJson             415: a body not declared as JSON
    └── Overloaded          the node already holds `RequestGate.limit` requests (with Retry-After)

Browser-facing defaults: every body must be declared as JSON (a page's cross-origin "simple"
request, `text/plain` or no type, is refused before it reaches a handler), and `HostCheckMiddleware`
answers only to the node's own names (a DNS-rebinding page reaches the node under its own name).
`caller_id` names the credential a request offers; the A2A stores scope tasks and push configs to
it, and the chat APIs their cache families.

The middleware is plain ASGI (not `BaseHTTPMiddleware`) so SSE responses stream through untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping

from a2a.server.request_handlers.response_helpers import build_error_response
from a2a.utils.error_handlers import build_rest_error_payload
from a2a.utils.errors import A2AError, ContentTypeNotSupportedError, InvalidRequestError
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.a2a.cards import API_KEY_HEADER

logger = logging.getLogger(__name__)
CARD_SUFFIXES = ("/.well-known/agent-card.json", "/.well-known/agent.json")
PUBLIC_PATHS = ("/health",)
# The Anthropic and OpenAI APIs call the same checks themselves, to answer in their own error shapes.
SELF_CHECKING_PREFIXES = (
    "/v1/messages",
    "/v1/models",
    "/v1/chat/completions",
    "/registry/",
    "/dashboard",  # checks the key itself: a browser sends it as a cookie (node.server.dashboard)
)
UNSUPPORTED_MEDIA_TYPE = 415
RETRY_AFTER_S = 2
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


class Refused(Exception):
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthorized(Refused):
    status = 401


class BodyTooLarge(Refused):
    status = 413

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"request body of {size} bytes exceeds the node's limit of {limit} bytes")
        self.size, self.limit = size, limit


class NotJson(Refused):
    status = UNSUPPORTED_MEDIA_TYPE


class Overloaded(Refused):
    status = 529
    retry_after_s = RETRY_AFTER_S


# ---- the API key ---------------------------------------------------------------------------
def offered_keys(headers: Mapping[str, str]) -> list[str]:
    """The keys a request offers: `X-API-Key` and an `Authorization: Bearer` token."""
    keys = [headers.get(API_KEY_HEADER.lower(), "")]
    authorization = headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        keys.append(authorization[7:].strip())
    return [key for key in keys if key]


def has_key(headers: Mapping[str, str], expected: str | None) -> bool:
    """True when no key is configured or one of the offered keys is it (compared in constant time)."""
    if not expected:
        return True
    return any(hmac.compare_digest(key.encode(), expected.encode()) for key in offered_keys(headers))


def require_key(headers: Mapping[str, str], expected: str | None) -> None:
    if not has_key(headers, expected):
        raise Unauthorized("missing or invalid API key (send it as x-api-key or Authorization: Bearer)")


def caller_id(headers: Mapping[str, str]) -> str:
    """Who is calling, as far as the node can tell: a digest of the first key offered (never the
    key itself), or `anonymous`."""
    keys = offered_keys(headers)
    if not keys:
        return "anonymous"
    return "key-" + hashlib.sha256(keys[0].encode("utf-8", "replace")).hexdigest()[:16]


class CallerBackend(AuthenticationBackend):
    """Starlette authentication that names the caller (`request.user.display_name`): the A2A SDK
    scopes a task, its push configs and task listings to that name."""

    async def authenticate(self, conn: HTTPConnection):
        return AuthCredentials(), SimpleUser(caller_id(conn.headers))


# ---- the body limit ------------------------------------------------------------------------
class BodyCounter:
    """Counts a body's bytes as they arrive; refuses it as soon as it is known to exceed `limit`."""

    def __init__(self, headers: Mapping[str, str], limit: int) -> None:
        self.limit, self.received = limit, 0
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(int(declared), limit)

    def add(self, size: int) -> None:
        self.received += size
        if self.received > self.limit:
            raise BodyTooLarge(self.received, self.limit)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with `BodyTooLarge` past `limit` bytes."""
    counter, chunks = BodyCounter(request.headers, limit), []
    async for chunk in request.stream():
        counter.add(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


def require_json(headers: Mapping[str, str]) -> None:
    content_type = headers.get("content-type")
    if content_type is None or not is_json(content_type):
        raise NotJson(f"Content-Type {content_type!r}: send application/json")


# ---- admission -----------------------------------------------------------------------------
class RequestGate:
    """Counts the generating requests the node holds (running or queued for the model), of every
    API: refuses new ones beyond `limit`, so the limit is the node's.

    `enter`/`leave` hold a slot for a request's handler; `reserve(key)`/`release(key)` hold one
    for work that outlives it (an A2A task runs on after `message/send` returns); a key is released
    at most as often as it was reserved."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.refused = 0
        self._reserved: Counter[str] = Counter()

    def enter(self) -> None:
        if self.active >= self.limit:
            self.refused += 1
            raise Overloaded(f"the node already holds {self.active} requests; retry later")
        self.active += 1

    def leave(self) -> None:
        self.active -= 1

    def reserve(self, key: str) -> None:
        self.enter()
        self._reserved[key] += 1

    def release(self, key: str) -> None:
        if self._reserved[key] > 0:
            self._reserved[key] -= 1
            self.leave()
        if not self._reserved[key]:
            del self._reserved[key]


class GatedStream(StreamingResponse):
    """A streaming response that frees its gate slot however it ends (also on disconnect)."""

    def __init__(self, content, gate: RequestGate, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._gate.leave()


def is_public(scope: Scope) -> bool:
    """Cards (at every agent's path) and the liveness probe need no key."""
    path = scope.get("path", "")
    return scope.get("method") in ("GET", "HEAD") and (path.endswith(CARD_SUFFIXES) or path in PUBLIC_PATHS)


def checks_itself(scope: Scope) -> bool:
    return scope.get("path", "").startswith(SELF_CHECKING_PREFIXES)


def is_json(content_type: str) -> bool:
    """`application/json`, or a JSON-based type such as `application/a2a+json`."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


Endpoint = Callable[[Request], Awaitable[Response]]


LONE_SURROGATE = "the request body holds a lone surrogate (\\ud800-\\udfff): not valid text"


def holds_lone_surrogate(value: object) -> bool:
    """Whether parsed JSON holds a lone surrogate (JSON may escape one, "\\ud800"; no UTF-8 text
    can carry it, so every answer that echoes it back, even an error naming its id, would fail)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def jsonrpc_error(error: A2AError) -> Response:
    return JSONResponse(build_error_response(None, error))


def rest_error(error: A2AError) -> Response:
    # The spec's error table maps ContentTypeNotSupportedError to 415 (the SDK's mapping says 400).
    payload = build_rest_error_payload(error)
    status = UNSUPPORTED_MEDIA_TYPE if isinstance(error, ContentTypeNotSupportedError) else 400
    payload["error"]["code"] = status
    return JSONResponse(payload, status_code=status)


def json_only(endpoint: Endpoint, refuse: Callable[[A2AError], Response]) -> Endpoint:
    """An endpoint that takes a body only when it is declared as JSON and holds valid text.

    The SDK would parse a body of another declared type anyway (JSON-RPC: -32700 when it is not
    JSON; HTTP+JSON: as JSON). Refusing it with ContentTypeNotSupportedError also keeps browsers'
    cross-origin "simple" requests (`text/plain` or no type need no CORS preflight) out: a body must
    declare JSON. A body escaping a lone surrogate is refused as an invalid request before the SDK
    parses it (it would echo the surrogate in its answer and fail with a 500)."""

    async def checked(request: Request) -> Response:
        content_type = request.headers.get("content-type")
        if content_type is None or not is_json(content_type):
            return refuse(
                ContentTypeNotSupportedError(message=f"Content-Type {content_type!r}: send application/json")
            )
        try:
            body = await request.body()  # kept by the request: the SDK's endpoint reads it again
        except A2AError as e:  # too large (BodyLimitMiddleware)
            return refuse(e)
        if b"\\ud" in body.lower():
            try:
                surrogate = holds_lone_surrogate(json.loads(body))
            except (ValueError, RecursionError):
                surrogate = False  # not JSON at all: the SDK answers that itself
            if surrogate:
                return refuse(InvalidRequestError(message=LONE_SURROGATE))
        return await endpoint(request)

    return checked


class ApiKeyMiddleware:
    """Refuses every non-public request that does not carry the key (bearer token or X-API-Key)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or is_public(scope)
            or checks_itself(scope)
            or has_key(Headers(scope=scope), self._key)
        ):
            await self.app(scope, receive, send)
            return
        logger.info("refused %s %s: missing or wrong API key", scope.get("method"), scope.get("path"))
        response = JSONResponse(
            {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "missing or invalid API key"}},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="a2a-node"'},
        )
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """Stops reading a request body past `max_bytes`.

    The error is raised from `receive`, inside the SDK's dispatchers, which turn an `A2AError` into
    the transport's own error: JSON-RPC -32600 or an HTTP+JSON 400, not a 500.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or checks_itself(scope):
            await self.app(scope, receive, send)
            return
        await self.app(scope, self._limited(scope, receive), send)

    def _limited(self, scope: Scope, receive: Receive) -> Receive:
        headers = Headers(scope=scope)
        counter: BodyCounter | None = None

        async def limited_receive() -> Message:
            nonlocal counter
            try:
                counter = counter or BodyCounter(headers, self.max_bytes)
                message = await receive()
                counter.add(len(message.get("body", b"")))
            except BodyTooLarge as e:
                raise InvalidRequestError(
                    message=f"Payload too large: {e.size} bytes, the limit is {e.limit}"
                ) from e
            return message

        return limited_receive


class HostCheckMiddleware:
    """Answers only requests whose Host header names the node: loopback names, its bind address,
    its public URL's host and `names` (`*`: any). A DNS-rebinding page's requests carry the
    attacker's name and are refused, so it cannot read what the node serves on loopback."""

    def __init__(self, app: ASGIApp, names: Iterable[str]) -> None:
        self.app = app
        self.names = {name.lower().strip("[]") for name in (*names, *LOOPBACK_NAMES)}
        self.any = "*" in self.names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any or self.allows(Headers(scope=scope).get("host", "")):
            await self.app(scope, receive, send)
            return
        logger.info("refused %s %s: Host %r is not one of the node's names", scope.get("method"),
                    scope.get("path"), Headers(scope=scope).get("host"))  # fmt: skip
        response = JSONResponse({"error": {"code": 421, "message": "unknown Host"}}, status_code=421)
        await response(scope, receive, send)

    def allows(self, host: str) -> bool:
        """`host` (a Host header: name, `name:port`, `[v6]:port`) names the node."""
        name = host.lower()
        if name.startswith("["):
            name = name[1 : name.find("]")]
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        return name in self.names
