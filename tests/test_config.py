"""`NodeConfig` validation: each setting it refuses, the edges it accepts, and the URLs it derives."""

from __future__ import annotations

import pytest

from node.config import ALL_SKILLS, NodeConfig

POSITIVE = ("max_message_bytes", "max_tokens", "max_agents", "memory_budget_bytes", "threads")


def config(**settings) -> NodeConfig:
    return NodeConfig(**settings)


def test_defaults_are_valid():
    defaults = config()
    assert defaults.skills == ALL_SKILLS and defaults.port == 8000
    assert defaults.registry is False and defaults.join is None and defaults.peers == ()


@pytest.mark.parametrize("skills", [("astrology",), ("coordination", "astrology"), ("Coordination",)])
def test_unknown_skills_are_refused(skills):
    with pytest.raises(ValueError, match=r"unknown skills .*known: technical_analysis"):
        config(skills=skills)


def test_each_skill_alone_and_none_are_accepted():
    for skill in ALL_SKILLS:
        assert config(skills=(skill,)).skills == (skill,)
    assert config(skills=()).skills == ()


@pytest.mark.parametrize("port", [0, -1, 65536, 100_000])
def test_port_out_of_range_is_refused(port):
    with pytest.raises(ValueError, match=f"port {port} is out of range"):
        config(port=port)


@pytest.mark.parametrize("port", [1, 65535])
def test_port_edges_are_accepted(port):
    assert config(port=port).port == port


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("name", POSITIVE)
def test_sizes_and_counts_must_be_positive(name, value):
    with pytest.raises(ValueError, match=f"{name} must be positive"):
        config(**{name: value})
    assert getattr(config(**{name: 1}), name) == 1


@pytest.mark.parametrize("name", ["peer_timeout_s", "heartbeat_s"])
@pytest.mark.parametrize("value", [0, 0.0, -0.5])
def test_timeouts_must_be_positive(name, value):
    with pytest.raises(ValueError, match="peer_timeout_s and heartbeat_s must be positive"):
        config(**{name: value})
    assert getattr(config(**{name: 0.01}), name) == 0.01


@pytest.mark.parametrize(
    "url",
    ["postgresql://u@h/db", "postgres+asyncpg://u@h/db", "sqlite:///x.db", "mysql+aiomysql://h/db", ""],
)
def test_database_url_needs_an_async_driver_scheme(url):
    with pytest.raises(ValueError, match=r"database_url must start with one of postgresql\+asyncpg://"):
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
