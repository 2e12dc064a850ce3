"""Agent ids: what they may contain, how ids are derived from outside keys, and their folder names.

One scheme for the whole node. An agent id is 1-128 characters from `A-Z a-z 0-9 . _ : -`,
starting with a letter or digit, without `..`. Keys from outside (an A2A contextId, a system
prompt, a session id) may hold anything, so an agent id derived from one is a readable namespace
plus a digest of the key: `derived_agent_id("technical_analysis.ctx", key)`.
"""

from __future__ import annotations

import hashlib
import re

from node.errors import InvalidAgentId

AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
DIGEST_CHARS = 24


def digest(key: str, chars: int = DIGEST_CHARS) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:chars]


def validate_agent_id(agent_id: str) -> str:
    if not isinstance(agent_id, str) or not AGENT_ID.match(agent_id) or ".." in agent_id:
        raise InvalidAgentId(
            f"invalid agent id {agent_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit, without '..'"
        )
    return agent_id


def derived_agent_id(namespace: str, key: str) -> str:
    """The agent id for `key` (any text) within `namespace` (itself a valid agent id prefix)."""
    return validate_agent_id(f"{namespace}-{digest(key)}")


def agent_dirname(agent_id: str) -> str:
    """A folder name that is safe everywhere and unique even where the filesystem folds case."""
    readable = re.sub(r"[^a-z0-9_-]", "_", agent_id.lower())[:48]
    return f"{readable}-{digest(agent_id, 16)}"
