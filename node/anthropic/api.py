"""The Anthropic Messages API on the node, served from the persistent agents.

    POST /v1/messages               (also ?beta=true, as Claude Code sends it)
    POST /v1/messages/count_tokens
    GET  /v1/models, GET /v1/models/{id}

Any model name is accepted and served by the node's one model (responses echo the name asked for).
With `config.api_key` set, a request must carry it as `x-api-key` or `Authorization: Bearer`.
At most `max_pending` requests are held at once (running or queued for the model); beyond that the
node answers 529 overloaded_error, which clients retry.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from node.anthropic.errors import (
    ApiError,
    api_error_from,
    authentication_failed,
    error_response,
    invalid_request,
    not_found,
    overloaded,
    request_too_large,
)
from node.anthropic.prompt import Prompt, render_prompt
from node.anthropic.request import MessagesRequest, parse_messages_request
from node.anthropic.responses import message_body, message_events, message_id, message_shell

logger = logging.getLogger(__name__)

MAX_PENDING = 16
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
Handler = Callable[[Request], Awaitable[Response]]


def anthropic_routes(manager, config, *, max_pending: int = MAX_PENDING) -> list[Route]:
    """The API's routes. `manager` is an `AgentManager`, or a callable that returns it (None while
    the node is starting: requests then get 503) for apps that start their manager at start-up."""
    return MessagesApi(manager, config, max_pending).routes()


class RequestGate:
    """Counts the requests the node holds; refuses new ones beyond `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def enter(self) -> None:
        if self.active >= self.limit:
            raise overloaded(f"the node already holds {self.active} requests; retry later")
        self.active += 1

    def leave(self) -> None:
        self.active -= 1


class _GatedStream(StreamingResponse):
    """A streaming response that frees its gate slot however it ends (also on disconnect)."""

    def __init__(self, content, gate: RequestGate, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._gate.leave()


class MessagesApi:
    def __init__(self, manager, config, max_pending: int) -> None:
        self._manager = manager
        self.config = config
        self.gate = RequestGate(max_pending)
        self._model: dict | None = None

    @property
    def manager(self):
        manager = self._manager() if callable(self._manager) else self._manager
        if manager is None:
            raise ApiError(503, "api_error", "the node is still starting; retry shortly")
        return manager

    @property
    def model(self) -> dict:
        if self._model is None:
            self._model = model_object(self.manager.engine)
        return self._model

    def routes(self) -> list[Route]:
        return [
            Route("/v1/messages", self._endpoint(self.create), methods=["POST"]),
            Route("/v1/messages/count_tokens", self._endpoint(self.count_tokens), methods=["POST"]),
            Route("/v1/models", self._endpoint(self.list_models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", self._endpoint(self.get_model), methods=["GET"]),
        ]

    def _endpoint(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            headers = {"request-id": "req_" + secrets.token_hex(12)}
            try:
                self._authenticate(request)
                response = await handler(request)
            except Exception as e:  # noqa: BLE001 - the edge: every failure becomes an API error
                return error_response(api_error_from(e), headers)
            response.headers.update(headers)
            return response

        return endpoint

    # ---- endpoints -----------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        parsed = parse_messages_request(await self._json(request))
        prompt = self._prompt(parsed)
        params = self._sampling(parsed)
        metadata = {"api": "anthropic", "model": parsed.model, "turns": len(parsed.turns)}
        msg_id = message_id()
        self.gate.enter()
        if parsed.stream:
            items = self.manager.stream(prompt.agent_id, prompt.tokens, params, metadata=metadata)
            events = message_events(items, message_shell(msg_id, parsed.model, len(prompt.tokens)))
            return _GatedStream(events, self.gate, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            completion = await self.manager.generate(
                prompt.agent_id, prompt.tokens, params, metadata=metadata
            )
        finally:
            self.gate.leave()
        return JSONResponse(message_body(msg_id, parsed.model, completion))

    async def count_tokens(self, request: Request) -> Response:
        parsed = parse_messages_request(await self._json(request), require_max_tokens=False)
        return JSONResponse({"input_tokens": len(render_prompt(self.manager.engine, parsed).tokens)})

    async def list_models(self, request: Request) -> Response:
        model_id = self.model["id"]
        return JSONResponse(
            {"data": [self.model], "has_more": False, "first_id": model_id, "last_id": model_id}
        )

    async def get_model(self, request: Request) -> Response:
        if request.path_params["model_id"] != self.model["id"]:
            raise not_found(f"model: {request.path_params['model_id']} (this node serves {self.model['id']})")
        return JSONResponse(self.model)

    # ---- helpers -------------------------------------------------------------------------
    def _authenticate(self, request: Request) -> None:
        expected = self.config.api_key
        if not expected:
            return
        offered = [request.headers.get("x-api-key"), _bearer_token(request.headers.get("authorization"))]
        if not any(key and hmac.compare_digest(key.encode(), expected.encode()) for key in offered):
            raise authentication_failed()

    async def _json(self, request: Request) -> object:
        body = await read_body(request, self.config.max_message_bytes)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise invalid_request(f"the request body is not valid JSON: {e}") from e

    def _prompt(self, parsed: MessagesRequest) -> Prompt:
        prompt = render_prompt(self.manager.engine, parsed)
        limit = self.manager.engine.context_limit
        max_tokens = self._max_tokens(parsed)
        if len(prompt.tokens) + max_tokens > limit:
            raise invalid_request(
                f"prompt is too long: {len(prompt.tokens)} tokens + max_tokens {max_tokens} > {limit} maximum"
            )
        return prompt

    def _max_tokens(self, parsed: MessagesRequest) -> int:
        return min(parsed.max_tokens, self.config.max_tokens)

    def _sampling(self, parsed: MessagesRequest):
        from node.runtime.generation import SamplingParams  # model-side module: imports mlx

        return SamplingParams(
            max_tokens=self._max_tokens(parsed),
            temperature=parsed.temperature,
            top_p=parsed.top_p,
            stop=parsed.stop_sequences,
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise request_too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise request_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _bearer_token(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def model_object(engine) -> dict:
    """The node's model as the Models API lists it."""
    name = engine.info.name
    model_id = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.split(" (")[0]).name.removesuffix(".gguf"))
    folder = Path(engine.info.folder)
    created = folder.stat().st_mtime if folder.exists() else 0.0
    return {
        "type": "model",
        "id": model_id,
        "display_name": name,
        "created_at": datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z"),
    }
