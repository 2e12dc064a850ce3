"""The Anthropic Messages API on the node, served from the persistent agents.

    POST /v1/messages               (also ?beta=true, as Claude Code sends it)
    POST /v1/messages/count_tokens
    GET  /v1/models, GET /v1/models/{id}   (OpenAI's shape without an anthropic-version header)

Any model name is accepted and served by the node's one model (responses echo the name asked for).
The API key, the body limit and admission are the node's shared guards (`node.server.guards`):
with `config.api_key` set a request must carry it as `x-api-key` or `Authorization: Bearer`; at
most `max_pending` requests (of every API) are held at once, beyond that the node answers 529
overloaded_error, which clients retry. Which agent serves a conversation, and why conversations
never rewind each other, is `node.memory.sessions`'s; stop reasons are `node.anthropic.chat`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.anthropic.chat import ChatService, Reply
from node.anthropic.errors import api_error_from, error_response, invalid_request, not_found
from node.anthropic.models import model_id, model_list, model_object, wants_anthropic_shape
from node.anthropic.prompt import render_prompt
from node.anthropic.request import parse_messages_request
from node.anthropic.responses import message_body, message_events, message_id, message_shell
from node.server.guards import (
    LONE_SURROGATE,
    GatedStream,
    Overloaded,
    caller_id,
    holds_lone_surrogate,
    read_body,
    require_json,
    require_key,
)

logger = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
Handler = Callable[[Request], Awaitable[Response]]


def anthropic_routes(chat: ChatService) -> list[Route]:
    """The API's routes on `chat` (shared with the OpenAI API: one gate, one conversation index)."""
    return MessagesApi(chat).routes()


async def read_json(request: Request, limit: int, invalid: Callable[[str], Exception]) -> object:
    """The body as JSON: declared as JSON, within `limit`, valid UTF-8 text throughout (a lone
    surrogate escape such as "\\ud800" is refused here, not deep in the tokenizer)."""
    require_json(request.headers)
    body = await read_body(request, limit)
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise invalid(f"the request body is not valid JSON: {e}") from e
    if holds_lone_surrogate(value):
        raise invalid(LONE_SURROGATE)
    return value


class MessagesApi:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

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
                require_key(request.headers, self.chat.config.api_key)
                response = await handler(request)
            except Exception as e:  # noqa: BLE001 - the edge: every failure becomes an API error
                error = api_error_from(e)
                if error.status == Overloaded.status:
                    headers["retry-after"] = str(Overloaded.retry_after_s)
                return error_response(error, headers)
            response.headers.update(headers)
            return response

        return endpoint

    # ---- endpoints -----------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        body = await read_json(request, self.chat.config.max_message_bytes, invalid_request)
        parsed = parse_messages_request(body, request.headers)
        prompt = self.chat.prompt(parsed, caller_id(request.headers))
        msg_id, gate = message_id(), self.chat.gate
        gate.enter()
        if parsed.stream:
            items = self.chat.turn(parsed, prompt, "anthropic")
            events = message_events(items, message_shell(msg_id, parsed.model, len(prompt.tokens)))
            return GatedStream(events, gate, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            reply: Reply = [item async for item in self.chat.turn(parsed, prompt, "anthropic")][-1]
        finally:
            gate.leave()
        return JSONResponse(message_body(msg_id, parsed.model, reply))

    async def count_tokens(self, request: Request) -> Response:
        body = await read_json(request, self.chat.config.max_message_bytes, invalid_request)
        parsed = parse_messages_request(body, request.headers, require_max_tokens=False)
        self.chat.gate.enter()  # tokenizing a large prompt costs the node too
        try:
            tokens = await asyncio.to_thread(render_prompt, self.chat.manager.engine, parsed)
        finally:
            self.chat.gate.leave()
        return JSONResponse({"input_tokens": len(tokens.tokens)})

    async def list_models(self, request: Request) -> Response:
        return JSONResponse(model_list(self.chat.manager.engine, wants_anthropic_shape(request.headers)))

    async def get_model(self, request: Request) -> Response:
        engine, wanted = self.chat.manager.engine, request.path_params["model_id"]
        if wanted != model_id(engine):
            raise not_found(f"model: {wanted} (this node serves {model_id(engine)})")
        if wants_anthropic_shape(request.headers):
            return JSONResponse(model_object(engine))
        return JSONResponse(model_list(engine, False)["data"][0])
