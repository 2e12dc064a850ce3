"""The block store's settings are checked where they are read: a bad one is a clear error at start,
not a failure (or a panic in the Rust client) at the first upload."""

from __future__ import annotations

import pytest

from node.errors import ConfigError
from node.memory.remote_store import ObjectStore


@pytest.mark.parametrize("url", ["bucket/prefix", "http://bucket/prefix", "s3://"])
def test_a_store_is_an_s3_url(url):
    with pytest.raises(ConfigError, match="s3://BUCKET/PREFIX"):
        ObjectStore(url)


@pytest.mark.parametrize("endpoint", ["localhost:9000", "ftp://store.lan", "http://"])
def test_an_endpoint_is_an_http_url(monkeypatch, endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL"):
        ObjectStore("s3://bucket/prefix")


def test_a_store_that_does_not_answer_is_unavailable_not_an_error(monkeypatch):
    from node.bench.seaweedfs import free_port
    from node.memory.remote_store import StoreUnavailable

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    store = ObjectStore("s3://bucket/prefix")
    with pytest.raises(StoreUnavailable):
        store.versions("agent")
