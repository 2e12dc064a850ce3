"""Node settings, validated once, and the one place the node reads its environment.

Every field of `NodeConfig` is a user setting with a CLI flag (`--max-agents`) and an environment
variable (`NODE_MAX_AGENTS`); a flag given on the command line wins over the variable, which wins
over the default. `NodeConfig.from_settings` applies that rule; the CLI builds its `serve` flags
from `SETTINGS`, so flags and fields map one-to-one. Process-wide switches that must be known
before a config exists (the BLAS binding happens on import) are read here too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from node.errors import ConfigError

ALL_SKILLS = ("technical_analysis", "business_analysis", "coordination")
DATABASE_SCHEMES = ("postgresql+asyncpg://", "sqlite+aiosqlite://")
ENV_PREFIX = "NODE_"


def user_cache_dir() -> Path:
    """Where the node keeps derived files it can rebuild (converted models, compiled helpers)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "persistent-agent-node"


def model_cache_root() -> Path:
    """Converted models: `$NODE_MODEL_CACHE`, else under the user cache folder."""
    override = os.environ.get("NODE_MODEL_CACHE")
    return Path(override).expanduser() if override else user_cache_dir() / "models"


def default_cache_dir() -> Path:
    return Path(os.environ.get("NODE_CACHE_DIR") or Path.home() / ".agent_caches").expanduser()


def switch_on(name: str) -> bool:
    """A process-wide switch (`NODE_CPU_KERNELS`, `NODE_THIN_SGEMM`): on unless set to 0."""
    return os.environ.get(ENV_PREFIX + name) != "0"


KV_STORAGES = ("float16", "bfloat16", "int8")
DEFAULT_DISK_BUDGET_BYTES = 16 << 30


def disk_budget_for(folder: Path) -> int:
    """The default disk budget: 16 GiB, or half the free space where the folder lives if less."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return min(DEFAULT_DISK_BUDGET_BYTES, shutil.disk_usage(probe).free // 2)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _setting(default, help: str, flag: str | None = None, default_factory=None):
    metadata = {"help": help, "flag": flag}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class NodeConfig:
    host: str = _setting("127.0.0.1", "interface to bind")
    port: int = _setting(8000, "port to bind")
    skills: tuple[str, ...] = _setting(ALL_SKILLS, "comma-separated skill ids to host")
    model: str = _setting("default", "'default', an mlx-lm folder or a .gguf file")
    cache_dir: Path = _setting(  # noqa: RUF009 (a field() with help)
        None, "agent checkpoints (default ~/.agent_caches)", default_factory=default_cache_dir
    )
    api_key: str | None = _setting(None, "require this key (Bearer or X-API-Key) on every call but the cards")
    max_message_bytes: int = _setting(256_000, "largest request body")
    max_tokens: int = _setting(256, "most tokens generated per task")
    stream_chunk_s: float = _setting(
        0.1,
        "seconds an A2A stream gathers text into one artifact chunk (0: a chunk per token)",
        flag="--stream-chunk",
    )
    max_agents: int = _setting(64, "agents kept in memory before the least recently used is evicted")
    memory_budget_bytes: int = _setting(4 << 30, "bytes of KV cache kept in memory before eviction")
    disk_budget_bytes: int | None = _setting(
        None,
        "bytes of KV blocks kept on disk before the least recently used contexts are evicted "
        "(default: 16 GiB or half the free space, whichever is less)",
        flag="--disk-budget",
    )
    kv_storage: str = _setting("float16", "KV blocks on disk: float16, bfloat16 or int8 (half the bytes)")
    block_store: str | None = _setting(
        None,
        "s3://BUCKET/PREFIX: share KV blocks and contexts with other nodes through S3-compatible storage "
        "(endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)",
    )
    threads: int = _setting(
        None, "compute threads (default: the cores this process may use)", default_factory=available_cores
    )
    peers: tuple[str, ...] = _setting((), "a peer node's URL (repeatable)", flag="--peer")
    join: str | None = _setting(None, "register with the registry at this node URL")
    registry: bool = _setting(False, "act as the network's registry (members in SQLite)")
    database_url: str | None = _setting(
        None, "postgresql+asyncpg://... : registry and A2A task store in PostgreSQL, shared by the nodes"
    )
    peer_timeout_s: float = _setting(120.0, "seconds per delegated sub-task", flag="--peer-timeout")
    heartbeat_s: float = _setting(10.0, "seconds between registry heartbeats", flag="--heartbeat")
    public_url: str | None = _setting(None, "the URL others reach this node at (default: host and port)")
    conformance: bool = _setting(
        False, "also serve the A2A conformance agent (the kit's scenarios) at /conformance"
    )
    network_key: str | None = _setting(
        None, "the network's secret: members send it to the registry to join, beat and leave"
    )
    peer_keys: tuple[str, ...] = _setting(
        (), "URL=KEY: the key this node sends to that peer's origin (repeatable)", flag="--peer-key"
    )
    allow_private_peers: bool = _setting(
        False, "let outbound calls reach private and link-local addresses (loopback is always allowed)"
    )
    allow_open_bind: bool = _setting(False, "bind a non-loopback address without --api-key")
    allowed_hosts: tuple[str, ...] = _setting(
        (), "Host header names the node answers to besides its own and loopback ('*': any)"
    )
    max_pending: int = _setting(16, "generating requests held at once (all APIs); beyond: overloaded")
    max_tasks: int = _setting(1000, "finished A2A tasks kept per agent before the oldest are dropped")
    delegation_timeout_s: float = _setting(
        300.0, "seconds one delegated sub-task may take over all its attempts", flag="--delegation-timeout"
    )
    share_cache_across_keys: bool = _setting(
        False, "let callers with different API keys reuse each other's cached prefixes"
    )
    mcp_servers: tuple[str, ...] = _setting(
        (),
        "an MCP server (streamable HTTP URL) whose tools the skills may call (repeatable)",
        flag="--mcp-server",
    )

    def __post_init__(self) -> None:
        unknown = [s for s in self.skills if s not in ALL_SKILLS]
        if unknown:
            raise ConfigError(f"unknown skills {unknown}; known: {', '.join(ALL_SKILLS)}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range")
        for name in (
            "max_message_bytes", "max_tokens", "max_agents", "memory_budget_bytes", "threads",
            "max_pending", "max_tasks",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.kv_storage not in KV_STORAGES:
            raise ConfigError(f"kv_storage must be one of {', '.join(KV_STORAGES)}, not {self.kv_storage!r}")
        if self.block_store is not None and not self.block_store.startswith("s3://"):
            raise ConfigError(f"block_store must be s3://BUCKET/PREFIX, not {self.block_store!r}")
        if self.disk_budget_bytes is not None and self.disk_budget_bytes <= 0:
            raise ConfigError("disk_budget_bytes must be positive")
        if self.peer_timeout_s <= 0 or self.heartbeat_s <= 0:
            raise ConfigError("peer_timeout_s and heartbeat_s must be positive")
        if self.delegation_timeout_s <= 0:
            raise ConfigError("delegation_timeout_s must be positive")
        if self.stream_chunk_s < 0:
            raise ConfigError("stream_chunk_s must be 0 or more")
        bad_keys = [entry for entry in self.peer_keys if "=" not in entry]
        if bad_keys:
            raise ConfigError(f"peer keys are URL=KEY; got {bad_keys}")
        if self.database_url is not None and not self.database_url.startswith(DATABASE_SCHEMES):
            raise ConfigError(f"database_url must start with one of {', '.join(DATABASE_SCHEMES)}")

    @classmethod
    def from_settings(
        cls, given: Mapping[str, object], environ: Mapping[str, str] = os.environ
    ) -> NodeConfig:
        """Flags given (None = not given) over `NODE_*` variables over the defaults."""
        values = {}
        for setting in SETTINGS:
            value = given.get(setting.name)
            if value is None and setting.env in environ:
                value = environ[setting.env]
            if value is not None:
                values[setting.name] = setting.parse(value)
        return cls(**values)

    @property
    def base_url(self) -> str:
        """The URL peers and cards use: `public_url` when set (a node bound to 0.0.0.0)."""
        return self.public_url.rstrip("/") if self.public_url else f"http://{self.host}:{self.port}"

    def check_exposure(self) -> None:
        """A node bound beyond loopback without a key serves anyone who can reach it: refuse that
        unless `allow_open_bind` says it is meant."""
        if self.api_key is None and not self.allow_open_bind and not is_loopback_host(self.host):
            raise ConfigError(
                f"binding {self.host} without --api-key exposes the node to the network; "
                "set --api-key, or --allow-open-bind if that is meant"
            )

    @property
    def registry_url(self) -> str | None:
        """Where this node registers and discovers peers: the node it joins, else itself if it
        is the registry, else nowhere."""
        if self.join:
            return self.join.rstrip("/")
        return self.base_url if self.registry else None


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1)."""
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _words(value) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(item.strip().rstrip("/") for item in items if item.strip())


def _flag_on(value) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"expected a yes/no value, got {value!r}")


def _number(kind: type) -> Callable[[object], object]:
    def parse(value):
        try:
            return kind(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"expected a number, got {value!r}") from e

    return parse


_PARSERS: dict[str, Callable[[object], object]] = {
    "int": _number(int),
    "float": _number(float),
    "bool": _flag_on,
    "Path": lambda v: Path(v).expanduser(),
    "tuple[str, ...]": _words,
}


@dataclass(frozen=True)
class Setting:
    """One user setting: its field, flag, environment variable and parser."""

    name: str
    flag: str
    env: str
    help: str
    kind: str

    @property
    def parse(self) -> Callable[[object], object]:
        return _PARSERS.get(self.kind, lambda v: v or None)


SETTINGS = tuple(
    Setting(
        name=f.name,
        flag=f.metadata["flag"] or "--" + f.name.replace("_", "-"),
        env=ENV_PREFIX + f.name.upper(),
        help=f.metadata["help"],
        kind=str(f.type).replace(" | None", ""),
    )
    for f in fields(NodeConfig)
)
