"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with its HTTP status.

Failures are first mapped by the node's one mapping (`node.anthropic.errors.api_error_from`, which
knows the node's errors and the shared guards' refusals), then reshaped here.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from node.anthropic.errors import ApiError, api_error_from

# Anthropic error type -> (HTTP status, None: the mapped one; OpenAI type, OpenAI code)
_SHAPES = {
    "invalid_request_error": (None, "invalid_request_error", None),
    "authentication_error": (401, "invalid_request_error", "invalid_api_key"),
    "not_found_error": (404, "invalid_request_error", "model_not_found"),
    "request_too_large": (413, "invalid_request_error", "request_too_large"),
    "overloaded_error": (503, "server_error", "overloaded"),
}


def openai_error(error: BaseException) -> tuple[int, dict]:
    mapped: ApiError = api_error_from(error)
    status, kind, code = _SHAPES.get(mapped.error_type, (mapped.status, "server_error", None))
    status = status or mapped.status
    return status, {"error": {"message": mapped.message, "type": kind, "param": None, "code": code}}


def error_response(error: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    status, body = openai_error(error)
    return JSONResponse(body, status_code=status, headers=headers)
