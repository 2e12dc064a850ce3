"""`NodeConfig` validation: each setting it refuses, the edges it accepts, the URLs it derives, and
`from_settings` (flags over `NODE_*` variables over defaults, values parsed from text)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from node.config import ALL_SKILLS, SETTINGS, NodeConfig
from node.errors import ConfigError

POSITIVE = ("max_message_bytes", "max_tokens", "max_agents", "memory_budget_bytes", "threads")


def config(**settings) -> NodeConfig:
    return NodeConfig(**settings)


def test_defaults_are_valid():
    defaults = config()
    assert defaults.skills == ALL_SKILLS and defaults.port == 8000
    assert defaults.registry is False and defaults.join is None and defaults.peers == ()


@pytest.mark.parametrize("skills", [("astrology",), ("coordination", "astrology"), ("Coordination",)])
def test_unknown_skills_are_refused(skills):
    with pytest.raises(ConfigError, match=r"unknown skills .*known: technical_analysis"):
        config(skills=skills)


def test_each_skill_alone_and_none_are_accepted():
    for skill in ALL_SKILLS:
        assert config(skills=(skill,)).skills == (skill,)
    assert config(skills=()).skills == ()


@pytest.mark.parametrize("port", [0, -1, 65536, 100_000])
def test_port_out_of_range_is_refused(port):
    with pytest.raises(ConfigError, match=f"port {port} is out of range"):
        config(port=port)


@pytest.mark.parametrize("port", [1, 65535])
def test_port_edges_are_accepted(port):
    assert config(port=port).port == port


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("name", POSITIVE)
def test_sizes_and_counts_must_be_positive(name, value):
    with pytest.raises(ConfigError, match=f"{name} must be positive"):
        config(**{name: value})
    assert getattr(config(**{name: 1}), name) == 1


@pytest.mark.parametrize("name", ["peer_timeout_s", "heartbeat_s"])
@pytest.mark.parametrize("value", [0, 0.0, -0.5])
def test_timeouts_must_be_positive(name, value):
    with pytest.raises(ConfigError, match="peer_timeout_s and heartbeat_s must be positive"):
        config(**{name: value})
    assert getattr(config(**{name: 0.01}), name) == 0.01


@pytest.mark.parametrize(
    "url",
    ["postgresql://u@h/db", "postgres+asyncpg://u@h/db", "sqlite:///x.db", "mysql+aiomysql://h/db", ""],
)
def test_database_url_needs_an_async_driver_scheme(url):
    with pytest.raises(ConfigError, match=r"database_url must start with one of postgresql\+asyncpg://"):
        config(database_url=url)


@pytest.mark.parametrize("url", ["postgresql+asyncpg://postgres@127.0.0.1:5432/db", "sqlite+aiosqlite:///x"])
def test_database_urls_with_async_drivers_are_accepted(url):
    assert config(database_url=url).database_url == url


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        config().port = 1  # type: ignore[misc]


# ---- derived URLs --------------------------------------------------------------------------
def test_base_url_from_host_and_port():
    assert config(host="127.0.0.1", port=8123).base_url == "http://127.0.0.1:8123"
    assert config(host="0.0.0.0", port=80).base_url == "http://0.0.0.0:80"


@pytest.mark.parametrize("public", ["https://node.example:8443", "https://node.example:8443/"])
def test_public_url_wins_without_its_trailing_slash(public):
    assert config(host="0.0.0.0", public_url=public).base_url == "https://node.example:8443"


def test_empty_public_url_falls_back_to_host_and_port():
    assert config(port=9000, public_url="").base_url == "http://127.0.0.1:9000"


def test_registry_url_is_nowhere_without_registry_or_join():
    assert config().registry_url is None


def test_the_registry_registers_with_itself():
    assert config(port=9100, registry=True).registry_url == "http://127.0.0.1:9100"
    public = config(registry=True, public_url="https://hub.example/")
    assert public.registry_url == "https://hub.example"


@pytest.mark.parametrize("registry", [False, True])
def test_join_wins_without_its_trailing_slash(registry):
    joined = config(port=9200, join="http://10.0.0.7:8000/", registry=registry)
    assert joined.registry_url == "http://10.0.0.7:8000"
    assert joined.base_url == "http://127.0.0.1:9200"


# ---- from_settings: flags, NODE_* variables, defaults --------------------------------------
def test_every_field_has_a_flag_and_a_variable():
    assert [s.name for s in SETTINGS] == [f.name for f in fields(NodeConfig)]
    for setting in SETTINGS:
        assert setting.env == "NODE_" + setting.name.upper() and setting.flag.startswith("--")
    assert len({s.flag for s in SETTINGS}) == len(SETTINGS)


def test_a_flag_wins_over_the_variable_which_wins_over_the_default():
    environ = {"NODE_PORT": "9001", "NODE_MAX_TOKENS": "77"}
    chosen = NodeConfig.from_settings({"port": 9002, "max_tokens": None}, environ)
    assert chosen.port == 9002 and chosen.max_tokens == 77
    assert chosen.max_agents == NodeConfig().max_agents


def test_variables_are_parsed_from_text():
    environ = {
        "NODE_SKILLS": " coordination , technical_analysis ,",
        "NODE_PEERS": "http://10.0.0.7:8000/,http://10.0.0.8:8000",
        "NODE_REGISTRY": "yes",
        "NODE_PEER_TIMEOUT_S": "2.5",
        "NODE_CACHE_DIR": "~/agent-caches",
        "NODE_API_KEY": "",
        "NODE_JOIN": "http://10.0.0.1:8000",
    }
    parsed = NodeConfig.from_settings({}, environ)
    assert parsed.skills == ("coordination", "technical_analysis")
    assert parsed.peers == ("http://10.0.0.7:8000", "http://10.0.0.8:8000")
    assert parsed.registry is True and parsed.peer_timeout_s == 2.5
    assert parsed.cache_dir == Path.home() / "agent-caches"
    assert parsed.api_key is None  # an empty variable is no key
    assert parsed.registry_url == "http://10.0.0.1:8000"


@pytest.mark.parametrize(
    "text, expected", [("1", True), ("On", True), ("0", False), ("no", False), ("", False)]
)
def test_yes_no_variables(text, expected):
    assert NodeConfig.from_settings({}, {"NODE_REGISTRY": text}).registry is expected


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"NODE_PORT": "eighty"}, "expected a number, got 'eighty'"),
        ({"NODE_MAX_TOKENS": "1.5"}, "expected a number"),
        ({"NODE_HEARTBEAT_S": "often"}, "expected a number"),
        ({"NODE_REGISTRY": "maybe"}, "expected a yes/no value, got 'maybe'"),
        ({"NODE_PORT": "0"}, "port 0 is out of range"),
        ({"NODE_SKILLS": "astrology"}, "unknown skills"),
        ({"NODE_DATABASE_URL": "mysql://db"}, "database_url must start with"),
    ],
)
def test_bad_variables_are_refused(environ, message):
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_settings({}, environ)
