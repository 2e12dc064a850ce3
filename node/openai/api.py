"""The OpenAI Chat Completions API on the node, for OpenAI clients (Open WebUI, aider, Continue, the
`openai` SDK), served from the same agents and caches as the Anthropic Messages API.

    POST /v1/chat/completions   (non-stream and stream, `stream_options.include_usage`)
    GET  /v1/models             (served by `node.anthropic.api`: OpenAI's shape without an
                                 `anthropic-version` header; see `node.anthropic.models`)

The API key (`Authorization: Bearer`, or `x-api-key`), the body limit and admission are the node's
shared guards (`node.server.guards`) and the same `ChatService` gate as /v1/messages; over the
limit the node answers 503, which OpenAI clients retry.
"""

from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.anthropic.api import SSE_HEADERS, read_json
from node.anthropic.chat import ChatService
from node.anthropic.errors import api_error_from, invalid_request
from node.openai.errors import error_response
from node.openai.request import parse_completions_request
from node.openai.responses import completion_body, completion_chunks, completion_id
from node.server.guards import GatedStream, Overloaded, caller_id, require_key


def openai_routes(chat: ChatService) -> list[Route]:
    return [Route("/v1/chat/completions", CompletionsApi(chat).create, methods=["POST"])]


class CompletionsApi:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def create(self, request: Request) -> Response:
        headers = {"x-request-id": "req_" + secrets.token_hex(12)}
        try:
            require_key(request.headers, self.chat.config.api_key)
            response = await self._create(request)
        except Exception as e:  # noqa: BLE001 - the edge: every failure becomes an API error
            if api_error_from(e).status == Overloaded.status:
                headers["retry-after"] = str(Overloaded.retry_after_s)
            return error_response(e, headers)
        response.headers.update(headers)
        return response

    async def _create(self, request: Request) -> Response:
        body = await read_json(request, self.chat.config.max_message_bytes, invalid_request)
        parsed = parse_completions_request(body, request.headers)
        chat_request = parsed.chat
        prompt = self.chat.prompt(chat_request, caller_id(request.headers))
        cid, gate = completion_id(), self.chat.gate
        gate.enter()
        items = self.chat.turn(chat_request, prompt, "openai")
        if chat_request.stream:
            chunks = completion_chunks(items, cid, chat_request.model, parsed.include_usage)
            return GatedStream(chunks, gate, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            reply = [item async for item in items][-1]
        finally:
            gate.leave()
        return JSONResponse(completion_body(cid, chat_request.model, reply))
