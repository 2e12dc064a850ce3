"""ASGI middleware in front of the A2A routes: the API key and the request-size limit; and
`json_only`, the content-type check in front of the endpoints that take a body.

The middleware is plain ASGI (not `BaseHTTPMiddleware`) so SSE responses stream through untouched.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from a2a.server.request_handlers.response_helpers import build_error_response
from a2a.utils.error_handlers import build_rest_error_payload
from a2a.utils.errors import ContentTypeNotSupportedError, InvalidRequestError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.a2a.cards import API_KEY_HEADER

logger = logging.getLogger(__name__)
CARD_SUFFIXES = ("/.well-known/agent-card.json", "/.well-known/agent.json")
PUBLIC_PATHS = ("/health",)
# The Anthropic Messages API (node.anthropic.api) checks the key and the body size itself and
# answers in Anthropic's error shape, which its clients (the SDK, Claude Code) parse.
SELF_CHECKING_PREFIXES = ("/v1/messages", "/v1/models")
UNSUPPORTED_MEDIA_TYPE = 415


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


def jsonrpc_error(error: ContentTypeNotSupportedError) -> Response:
    return JSONResponse(build_error_response(None, error))


def rest_error(error: ContentTypeNotSupportedError) -> Response:
    # The spec's error table maps ContentTypeNotSupportedError to 415 (the SDK's mapping says 400).
    payload = build_rest_error_payload(error)
    payload["error"]["code"] = UNSUPPORTED_MEDIA_TYPE
    return JSONResponse(payload, status_code=UNSUPPORTED_MEDIA_TYPE)


def json_only(endpoint: Endpoint, refuse: Callable[[ContentTypeNotSupportedError], Response]) -> Endpoint:
    """An endpoint that refuses a body declared as another media type than JSON.

    The SDK would parse such a body anyway (JSON-RPC: -32700 when it is not JSON; HTTP+JSON: as
    JSON). Refusing it with ContentTypeNotSupportedError also keeps browsers' cross-origin "simple"
    requests (`text/plain` needs no CORS preflight) out. A request without a Content-Type is
    parsed as before."""

    async def checked(request: Request) -> Response:
        content_type = request.headers.get("content-type")
        if content_type is None or is_json(content_type):
            return await endpoint(request)
        return refuse(
            ContentTypeNotSupportedError(message=f"Content-Type {content_type!r}: send application/json")
        )

    return checked


class ApiKeyMiddleware:
    """Refuses every non-public request that does not carry the key (bearer token or X-API-Key)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope) or checks_itself(scope) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        logger.info("refused %s %s: missing or wrong API key", scope.get("method"), scope.get("path"))
        response = JSONResponse(
            {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "missing or invalid API key"}},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="a2a-node"'},
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        offered = headers.get(API_KEY_HEADER.lower().encode("latin-1"), b"")
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer ":
            offered = authorization[7:].strip()
        return bool(offered) and hmac.compare_digest(offered, self._key)


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
        declared = _content_length(scope)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise self._too_large(declared)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large(received)
            return message

        return limited_receive

    def _too_large(self, size: int) -> InvalidRequestError:
        return InvalidRequestError(message=f"Payload too large: {size} bytes, the limit is {self.max_bytes}")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
