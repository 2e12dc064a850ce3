"""Node settings, validated once; the CLI maps its flags one-to-one onto `NodeConfig`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ALL_SKILLS = ("technical_analysis", "business_analysis", "coordination")
DATABASE_SCHEMES = ("postgresql+asyncpg://", "sqlite+aiosqlite://")


def user_cache_dir() -> Path:
    """Where the node keeps derived files it can rebuild (converted models, compiled helpers)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "persistent-agent-node"


def default_cache_dir() -> Path:
    return Path(os.environ.get("NODE_CACHE_DIR") or Path.home() / ".agent_caches").expanduser()


@dataclass(frozen=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    skills: tuple[str, ...] = ALL_SKILLS
    model: str = "default"
    cache_dir: Path = field(default_factory=default_cache_dir)
    api_key: str | None = None
    max_message_bytes: int = 256_000
    max_tokens: int = 256
    max_agents: int = 64
    memory_budget_bytes: int = 4 << 30
    peers: tuple[str, ...] = ()
    join: str | None = None
    registry: bool = False
    database_url: str | None = None
    peer_timeout_s: float = 120.0
    heartbeat_s: float = 10.0
    public_url: str | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.skills if s not in ALL_SKILLS]
        if unknown:
            raise ValueError(f"unknown skills {unknown}; known: {', '.join(ALL_SKILLS)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        for name in ("max_message_bytes", "max_tokens", "max_agents", "memory_budget_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.peer_timeout_s <= 0 or self.heartbeat_s <= 0:
            raise ValueError("peer_timeout_s and heartbeat_s must be positive")
        if self.database_url is not None and not self.database_url.startswith(DATABASE_SCHEMES):
            raise ValueError(f"database_url must start with one of {', '.join(DATABASE_SCHEMES)}")

    @property
    def base_url(self) -> str:
        """The URL peers and cards use: `public_url` when set (a node bound to 0.0.0.0)."""
        return self.public_url.rstrip("/") if self.public_url else f"http://{self.host}:{self.port}"

    @property
    def registry_url(self) -> str | None:
        """Where this node registers and discovers peers: the node it joins, else itself if it
        is the registry, else nowhere."""
        if self.join:
            return self.join.rstrip("/")
        return self.base_url if self.registry else None
