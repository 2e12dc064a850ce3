"""Anthropic-shaped API errors: `{"type": "error", "error": {"type", "message"}}` with its HTTP status.

`ApiError` is a protocol type and lives at the edge: the node's own errors (`node.errors`) and the
shared guards' refusals (`node.server.guards`) are mapped onto it here, once, by `api_error_from`.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from node.errors import (
    BlockStoreUnavailable,
    DiskBudgetExceeded,
    MemoryBudgetExceeded,
    NodeError,
    PromptTooLong,
    WorkerDead,
)
from node.server.guards import BodyTooLarge, NotJson, Overloaded, Refused, Unauthorized

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message

    def body(self) -> dict:
        return {"type": "error", "error": {"type": self.error_type, "message": self.message}}


def invalid_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found_error", message)


_REFUSALS = {
    Unauthorized: (401, "authentication_error"),
    BodyTooLarge: (413, "request_too_large"),
    Overloaded: (529, "overloaded_error"),
    NotJson: (415, "invalid_request_error"),
}


def api_error_from(error: BaseException) -> ApiError:
    """The Anthropic error a failure is reported as; unexpected ones are logged with their trace."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, Refused):
        status, error_type = _REFUSALS.get(type(error), (error.status, "invalid_request_error"))
        return ApiError(status, error_type, error.message)
    if isinstance(error, MemoryBudgetExceeded):
        return ApiError(529, "overloaded_error", f"the node's memory is full: {error}; retry later")
    if isinstance(error, BlockStoreUnavailable):
        return ApiError(529, "overloaded_error", f"{error}; retry later")
    if isinstance(error, PromptTooLong):
        return invalid_request(f"prompt is too long: {error}")
    if isinstance(error, DiskBudgetExceeded):
        return invalid_request(f"the conversation cannot be stored: {error}")
    if isinstance(error, WorkerDead):
        return ApiError(500, "api_error", f"the model worker is not running: {error}")
    if isinstance(error, NodeError):
        logger.warning("request failed: %s", error)
        return ApiError(500, "api_error", str(error))
    logger.exception("unexpected error while serving an Anthropic API request", exc_info=error)
    return ApiError(500, "api_error", "internal server error")


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)
