"""The shared tier of agent memory: KV blocks and context manifests in S3-compatible object storage.

    s3://BUCKET/PREFIX/blocks/<key[:2]>/<key>.head and <key>.rest
        the local block file (`checkpoint_format`) in two objects: its head (token ids and the
        whole-history layers, all a restore reads of an older block: `blocks.BlockFile.head_bytes`)
        and the rest. Whole GETs of small objects are what S3-compatible servers serve fastest
        (SeaweedFS: a ranged GET of a 4.7 MB object's first 770 KB took ~2.5x as long as the GET of
        a 770 KB object). The rest is written last: its presence means the block is whole. A block
        whose head is all of it (a model without sliding-window layers), and blocks uploaded before
        this layout, are one object, <key>.safetensors. A block's key names its whole prefix, so an
        upload is idempotent and N nodes sharing a playbook store it once.
    s3://BUCKET/PREFIX/contexts/<agent_dirname>/<version:012d>.json
        one version of a context's manifest. A version key is written once, with a conditional put
        (`If-None-Match: *`): two nodes never overwrite each other's state, and the highest version is
        the context. A version is written only after every block it names is in the store, and an
        object PUT is atomic, so a node killed mid-upload leaves no torn manifest: at worst blocks
        that nothing names yet.

The client is boto3 (botocore): the AWS SDK itself, kept by AWS, speaks every S3-compatible server
(SeaweedFS, MinIO, Ceph, R2), reads the standard `AWS_*` variables and config files, and its
thread-safe clients suit the node's threads (an uploader thread, downloads off the event loop).
Endpoint and credentials come from `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`
and `AWS_REGION`, as for any AWS tool.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from node.errors import ConfigError
from node.memory.agent_ids import agent_dirname

CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 20


class StoreUnavailable(Exception):
    """The object store did not answer (down, unreachable, refusing): callers keep serving locally."""


@dataclass(frozen=True)
class StoreUrl:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> StoreUrl:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"a block store is s3://BUCKET/PREFIX, not {url!r}")
        return cls(parts.netloc, parts.path.strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


class ObjectStore:
    """Blocks and versioned manifests in one bucket and prefix (every method may raise
    StoreUnavailable; a missing object is None or False, never an error)."""

    def __init__(self, url: str, client=None) -> None:
        self.url = StoreUrl.parse(url)
        self._client = client or _client()

    # ---- keys ----------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.url.prefix, *parts) if p)

    def block_key(self, key: str, part: str = "safetensors") -> str:
        """The object of a block: its `head` or `rest`, or all of it (`safetensors`)."""
        return self._key("blocks", key[:2], f"{key}.{part}")

    def _versions_prefix(self, agent_id: str) -> str:
        return self._key("contexts", agent_dirname(agent_id)) + "/"

    # ---- blocks --------------------------------------------------------------------------
    def has_block(self, key: str, split: bool = False) -> bool:
        return self._call(self._head, self.block_key(key, "rest" if split else "safetensors"))

    def put_block(self, key: str, path: Path, head: int | None = None) -> int:
        """Upload a block file unless the store has it, as head and rest when `head` (the head's
        bytes) is given; returns the bytes sent (0: already there)."""
        split = head is not None
        if self.has_block(key, split):
            return 0
        body = Path(path).read_bytes()
        parts = {"head": body[:head], "rest": body[head:]} if split else {"safetensors": body}
        for part, data in parts.items():  # the rest last: once it is there, the block is whole
            self._call(
                self._client.put_object, Bucket=self.url.bucket, Key=self.block_key(key, part), Body=data
            )
        return len(body)

    def get_block(self, key: str, target: Path, split: bool, part: str = "all") -> int | None:
        """Download a block into `target` (a temporary path the caller verifies): `all` of it, or
        of a block stored as head and rest (`split`) its `head` alone; None if absent."""
        parts = ("head", "rest") if split and part == "all" else (part if split else "safetensors",)
        size = 0
        for i, name in enumerate(parts):
            got = self._get(self.block_key(key, name), target, "ab" if i else "wb")
            if got is None:
                return None
            size += got
        return size

    def get_rest(self, key: str, target: Path) -> int | None:
        """Append the rest of a block to `target`, which holds its head: the `rest` object, or for
        a block stored whole (uploaded before heads and rests were apart) a ranged GET."""
        got = self._get(self.block_key(key, "rest"), target, "ab")
        if got is None:
            got = self._get(self.block_key(key), target, "ab", first=target.stat().st_size)
        return got

    def delete_block(self, key: str) -> None:
        for part in ("rest", "head", "safetensors"):
            self._call(self._client.delete_object, Bucket=self.url.bucket, Key=self.block_key(key, part))

    def _get(self, object_key: str, target: Path, mode: str, first: int = 0) -> int | None:
        extra = {"Range": f"bytes={first}-"} if first else {}
        try:
            response = self._call(self._client.get_object, Bucket=self.url.bucket, Key=object_key, **extra)
        except _Missing:
            return None
        return self._call(_stream_into, response["Body"], Path(target), mode)

    # ---- manifests -----------------------------------------------------------------------
    def versions(self, agent_id: str) -> list[int]:
        prefix = self._versions_prefix(agent_id)
        found, token = [], None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            try:
                page = self._call(
                    self._client.list_objects_v2, Bucket=self.url.bucket, Prefix=prefix, **extra
                )
            except _Missing:  # no bucket yet: no versions
                return []
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :].removesuffix(".json")
                if name.isdigit():
                    found.append(int(name))
            token = page.get("NextContinuationToken")
            if not token:
                return sorted(found)

    def latest_manifest(self, agent_id: str) -> dict | None:
        """The highest version of a context's manifest (its `version` field set), or None."""
        for version in reversed(self.versions(agent_id)):
            manifest = self.manifest(agent_id, version)
            if manifest is not None:
                return manifest
        return None

    def manifest(self, agent_id: str, version: int) -> dict | None:
        key = self._versions_prefix(agent_id) + f"{version:012d}.json"
        try:
            response = self._call(self._client.get_object, Bucket=self.url.bucket, Key=key)
            manifest = json.loads(self._call(response["Body"].read))
        except _Missing:
            return None
        except ValueError:
            return None  # not ours to trust; an older version still may be
        manifest["version"] = version
        return manifest

    def put_manifest(self, agent_id: str, version: int, manifest: dict) -> bool:
        """Write version `version` if no one has; False when that version exists already."""
        key = self._versions_prefix(agent_id) + f"{version:012d}.json"
        body = json.dumps({**manifest, "version": version}).encode()
        try:
            self._call(self._client.put_object, Bucket=self.url.bucket, Key=key, Body=body, IfNoneMatch="*")
        except _Conflict:
            return False
        return True

    def delete_versions(self, agent_id: str, versions: list[int]) -> None:
        prefix = self._versions_prefix(agent_id)
        for version in versions:
            self._call(self._client.delete_object, Bucket=self.url.bucket, Key=f"{prefix}{version:012d}.json")

    def bytes_stored(self) -> dict:
        """Objects and bytes under the prefix, blocks and manifests apart (for `bench` and tools)."""
        totals = {"blocks": 0, "block_bytes": 0, "manifests": 0, "manifest_bytes": 0}
        paginator = self._client.get_paginator("list_objects_v2")
        for page in self._call(lambda: list(paginator.paginate(Bucket=self.url.bucket, Prefix=self._key()))):
            for item in page.get("Contents", []):
                kind = "blocks" if "/blocks/" in f"/{item['Key']}" else "manifests"
                totals[kind] += 1
                totals[kind.removesuffix("s") + "_bytes"] += item["Size"]
        return totals

    def ensure_bucket(self) -> None:
        try:
            self._call(self._client.head_bucket, Bucket=self.url.bucket)
        except _Missing:
            self._call(self._client.create_bucket, Bucket=self.url.bucket)

    # ---- errors --------------------------------------------------------------------------
    def _head(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.url.bucket, Key=key)
        except Exception as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _call(self, function, *args, **kwargs):
        """Run one client call; map 'not found' and 'precondition failed' to local exceptions and
        everything the network or the server can do wrong to StoreUnavailable."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return function(*args, **kwargs)
        except ClientError as e:
            code = _code(e)
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                raise _Missing(code) from e
            if code in ("412", "PreconditionFailed", "ConditionalRequestConflict"):
                raise _Conflict(code) from e
            raise StoreUnavailable(f"{self.url}: {e}") from e
        except (BotoCoreError, OSError) as e:
            raise StoreUnavailable(f"{self.url}: {e}") from e


class _Missing(StoreUnavailable):
    """Not found (an object, or the whole bucket: then the store cannot take uploads yet)."""


class _Conflict(Exception):
    pass


def _stream_into(body, target: Path, mode: str) -> int:
    size = 0
    with target.open(mode) as handle:
        for chunk in body.iter_chunks(CHUNK_BYTES):
            size += handle.write(chunk)
    return size


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _client():
    """A boto3 S3 client from the standard variables, with short connect timeouts and few retries:
    a store that does not answer must not hold a restore for long (the node serves locally)."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": 2, "mode": "standard"},
        max_pool_connections=32,
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, region_name=region, config=config
    )
