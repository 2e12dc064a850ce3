"""Every HTTP call the node makes to others (registry, cards, peers) goes through one client built
here, which enforces three rules no caller can forget:

- credentials by destination: the network key goes to the registry's origin only, a peer's key
  (`--peer-key URL=KEY`) to that peer's origin only; the node's own inbound `--api-key` never
  leaves it (it goes to the node's own URL only, where the coordinator may delegate to itself);
- destinations: a host that resolves to a private, link-local, shared, reserved, multicast or
  unspecified address (cloud metadata at 169.254.169.254, internal services) is refused unless
  `--allow-private-peers`; loopback is allowed (local networks and the demo run there);
- response bodies are capped (`MAX_RESPONSE_BYTES`): a peer cannot fill the node's memory with an
  endless card or answer stream.

Refusals are `OutboundRefused` (an `httpx.TransportError`, so callers that handle network errors
handle these too).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httpx

from node.config import NodeConfig

MAX_RESPONSE_BYTES = 8 << 20


class OutboundRefused(httpx.TransportError):
    """An outbound request the node's policy does not allow (destination or response size)."""


def origin(url: str) -> str:
    """`scheme://host:port` of `url`, the port spelled out (`http://a` == `http://a:80`)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


def address_allowed(address: str, allow_private: bool) -> bool:
    """Loopback always; public unicast always; the rest only with `allow_private`."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if ip.is_loopback:
        return True
    if ip.is_unspecified or ip.is_multicast:
        return False
    return allow_private or (ip.is_global and not (ip.is_link_local or ip.is_reserved))


async def check_destination(url: str, allow_private: bool) -> None:
    """Raise `OutboundRefused` unless every address `url`'s host resolves to is allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutboundRefused(f"{url!r}: only http(s) URLs with a host are called")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise httpx.ConnectError(f"{parts.hostname}: cannot resolve: {e}") from e
    refused = sorted({info[4][0] for info in infos if not address_allowed(info[4][0], allow_private)})
    if refused:
        raise OutboundRefused(
            f"{parts.hostname} resolves to {', '.join(refused)}: private, link-local and metadata "
            "addresses are refused (--allow-private-peers allows them)"
        )


def peer_credentials(config: NodeConfig) -> dict[str, str]:
    """origin -> the bearer token this node sends there (the registry's, then each peer's)."""
    keys = {}
    if config.network_key and config.registry_url:
        keys[origin(config.registry_url)] = config.network_key
    for entry in config.peer_keys:
        url, _, key = entry.partition("=")
        keys[origin(url)] = key
    if config.api_key:  # the node delegates to itself like to any peer: its key goes to itself only
        keys[origin(config.base_url)] = config.api_key
    return keys


class OutboundCredentials(httpx.Auth):
    """Adds `Authorization: Bearer` for the request's origin, if this node holds a key for it."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self.keys = dict(keys)

    def auth_flow(self, request: httpx.Request):
        request.headers.pop("authorization", None)
        key = self.keys.get(origin(str(request.url)))
        if key:
            request.headers["authorization"] = f"Bearer {key}"
        yield request


class _CappedStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, url: str, limit: int) -> None:
        self._stream, self._url, self._limit = stream, url, limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._stream:
            received += len(chunk)
            if received > self._limit:
                raise OutboundRefused(f"{self._url}: response exceeds {self._limit} bytes")
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


class GuardedTransport(httpx.AsyncBaseTransport):
    """httpx's transport, after the destination check, with the response body capped."""

    def __init__(self, allow_private: bool, max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.allow_private = allow_private
        self.max_response_bytes = max_response_bytes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await check_destination(str(request.url), self.allow_private)
        response = await self._inner.handle_async_request(request)
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_response_bytes:
            await response.aclose()
            raise OutboundRefused(
                f"{request.url}: response of {length} bytes exceeds {self.max_response_bytes}"
            )
        stream = _CappedStream(response.stream, str(request.url), self.max_response_bytes)
        return httpx.Response(
            response.status_code, headers=response.headers, stream=stream, extensions=response.extensions
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


def outbound_client(config: NodeConfig, timeout_s: float | None = None) -> httpx.AsyncClient:
    """The node's one client for calls to others: guarded destinations, capped bodies, per-origin keys."""
    return httpx.AsyncClient(
        timeout=timeout_s or config.peer_timeout_s,
        transport=GuardedTransport(config.allow_private_peers),
        auth=OutboundCredentials(peer_credentials(config)),
        follow_redirects=False,
    )
