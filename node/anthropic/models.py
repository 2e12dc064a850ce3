"""The node's one model as the Models APIs list it, in Anthropic's shape and in OpenAI's.

`GET /v1/models` is one path for both APIs: a request with an `anthropic-version` header (every
Anthropic SDK and Claude Code send one) gets Anthropic's shape (`{"data": [...], "has_more", ...}`),
any other request OpenAI's (`{"object": "list", "data": [{"object": "model", ...}]}`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

OWNER = "persistent-agent-node"


def wants_anthropic_shape(headers) -> bool:
    return "anthropic-version" in headers


def model_id(engine) -> str:
    name = engine.info.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.split(" (")[0]).name.removesuffix(".gguf"))


def _created(engine) -> float:
    folder = Path(engine.info.folder)
    return folder.stat().st_mtime if folder.exists() else 0.0


def model_object(engine) -> dict:
    """Anthropic's model object."""
    created = datetime.fromtimestamp(_created(engine), UTC).isoformat().replace("+00:00", "Z")
    return {"type": "model", "id": model_id(engine), "display_name": engine.info.name, "created_at": created}


def openai_model_object(engine) -> dict:
    return {"id": model_id(engine), "object": "model", "created": int(_created(engine)), "owned_by": OWNER}


def model_list(engine, anthropic_shape: bool) -> dict:
    if not anthropic_shape:
        return {"object": "list", "data": [openai_model_object(engine)]}
    model = model_object(engine)
    return {"data": [model], "has_more": False, "first_id": model["id"], "last_id": model["id"]}
