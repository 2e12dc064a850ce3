"""Agent cards: JSON data in `agent_cards/`, filled with the served URL (and auth scheme) at start-up.

Each file holds one card in the A2A v1.0 JSON form with `{url}` placeholders. The node card lists
no skills of its own: it gets the skill entries of the skill cards the node hosts, so each skill is
described once.

A card lists the v1.0 and the v0.3 interfaces. The SDK serves a card that lists a v0.3 interface
with the v0.3 top-level fields (`url`, `preferredTransport`, `protocolVersion`,
`additionalInterfaces`) merged in, for v0.3 clients; the v1.0 card schema rejects those fields, so
the well-known path serves `current_card(card)` (v1.0 interfaces only) and the legacy path the full
card.

Interface URLs have no trailing slash: HTTP+JSON clients append `/message:send` etc. to them.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from a2a.compat.v0_3.versions import is_legacy_version
from a2a.types import AgentCard
from google.protobuf.json_format import ParseDict

NODE_CARD = "node"
CONFORMANCE_CARD = "conformance"
CONFORMANCE_PATH = "/conformance"
URL_PLACEHOLDER = "{url}"
API_KEY_HEADER = "X-API-Key"


def cards_dir() -> Path:
    """`agent_cards/` of a source checkout, or its copy inside an installed wheel."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "agent_cards", package / "_agent_cards"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no agent_cards folder next to {package}")


@cache
def load_card_data(name: str) -> dict:
    return json.loads((cards_dir() / f"{name}.json").read_text())


def skill_path(skill_id: str) -> str:
    return f"/skills/{skill_id}"


def node_card(base_url: str, skills: tuple[str, ...], api_key: bool) -> AgentCard:
    data = json.loads(json.dumps(load_card_data(NODE_CARD)))
    data["skills"] = [entry for skill_id in skills for entry in load_card_data(skill_id)["skills"]]
    return _build(data, base_url.rstrip("/"), api_key)


def skill_card(base_url: str, skill_id: str, api_key: bool) -> AgentCard:
    data = json.loads(json.dumps(load_card_data(skill_id)))
    return _build(data, base_url.rstrip("/") + skill_path(skill_id), api_key)


def conformance_card(base_url: str, api_key: bool) -> AgentCard:
    data = json.loads(json.dumps(load_card_data(CONFORMANCE_CARD)))
    return _build(data, base_url.rstrip("/") + CONFORMANCE_PATH, api_key)


def current_card(card: AgentCard) -> AgentCard:
    """`card` without its v0.3 interfaces: what v1.0 clients read at the well-known path."""
    current = AgentCard()
    current.CopyFrom(card)
    del current.supported_interfaces[:]
    current.supported_interfaces.extend(
        i for i in card.supported_interfaces if _is_current(i.protocol_version)
    )
    return current


def _is_current(protocol_version: str) -> bool:
    # Like the SDK, an interface without a version counts as a v0.3 one.
    return bool(protocol_version) and not is_legacy_version(protocol_version)


def _build(data: dict, url: str, api_key: bool) -> AgentCard:
    filled = _fill(data, url)
    if api_key:
        filled.update(_security())
    return ParseDict(filled, AgentCard())


def _fill(value, url: str):
    if isinstance(value, str):
        return value.replace(URL_PLACEHOLDER, url)
    if isinstance(value, list):
        return [_fill(item, url) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, url) for key, item in value.items()}
    return value


def _security() -> dict:
    """The node accepts its key either as a bearer token or in the X-API-Key header."""
    return {
        "securitySchemes": {
            "bearer": {"httpAuthSecurityScheme": {"scheme": "Bearer", "description": "the node's API key"}},
            "apiKey": {"apiKeySecurityScheme": {"location": "header", "name": API_KEY_HEADER}},
        },
        "securityRequirements": [{"schemes": {"bearer": {}}}, {"schemes": {"apiKey": {}}}],
    }
