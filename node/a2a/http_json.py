"""HTTP+JSON responses as the specification's binding writes them, where the SDK differs.

- Media type: section 11.1 says `Content-Type: application/json` for requests and responses; the
  SDK labels its HTTP+JSON responses `application/a2a+json`. Relabelled here (the body is the same
  JSON). Streams keep `text/event-stream`.
- Status: the specification's error table maps `ContentTypeNotSupportedError` to 415 Unsupported
  Media Type; the SDK's mapping answers 400. The error body (`google.rpc.Status` with the
  `CONTENT_TYPE_NOT_SUPPORTED` reason) already says which error it is, so its code becomes 415.
- Overload: the node's full admission gate (`node.a2a.handler`, an `InternalError` whose data says
  `OVERLOADED`) is 429 Too Many Requests with `Retry-After`, which HTTP clients retry, not a 500.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from a2a.utils.constants import A2A_JSON_MEDIA_TYPE
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

JSON_MEDIA_TYPE = "application/json"
UNSUPPORTED_MEDIA_TYPE = 415
CONTENT_TYPE_REASON = "CONTENT_TYPE_NOT_SUPPORTED"
TOO_MANY_REQUESTS = 429

Endpoint = Callable[[Request], Awaitable[Response]]


def as_specified(endpoint: Endpoint) -> Endpoint:
    """`endpoint` with its responses relabelled `application/json` and its 415 restored."""

    async def respond(request: Request) -> Response:
        response = await endpoint(request)
        if response.status_code == 400 and _reason(response) == CONTENT_TYPE_REASON:
            response = _with_status(response, UNSUPPORTED_MEDIA_TYPE)
        elif response.status_code == 500 and (retry_after := _overloaded(response)) is not None:
            response = _with_status(response, TOO_MANY_REQUESTS)
            response.headers["retry-after"] = str(retry_after)
        if response.headers.get("content-type", "").startswith(A2A_JSON_MEDIA_TYPE):
            response.headers["content-type"] = JSON_MEDIA_TYPE
        return response

    return respond


def _reason(response: Response) -> str | None:
    """The `ErrorInfo.reason` of an error body, if `response` holds one."""
    body = getattr(response, "body", b"")
    try:
        details = json.loads(body)["error"].get("details") or []
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return next((d.get("reason") for d in details if isinstance(d, dict) and d.get("reason")), None)


def _overloaded(response: Response) -> object | None:
    """The Retry-After seconds of an overload error body, None for any other response."""
    try:
        details = json.loads(getattr(response, "body", b""))["error"].get("details") or []
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    for detail in details:
        metadata = detail.get("metadata") if isinstance(detail, dict) else None
        if isinstance(metadata, dict) and metadata.get("reason") == "OVERLOADED":
            return metadata.get("retryAfterSeconds", 1)
    return None


def _with_status(response: Response, status: int) -> Response:
    payload = json.loads(response.body)
    payload["error"]["code"] = status
    return JSONResponse(payload, status_code=status)
