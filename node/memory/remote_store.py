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
    s3://BUCKET/PREFIX/packs/<key[:2]>/<key>.heads
        the heads of PACK_BLOCKS consecutive full blocks ending with block <key> (aligned from
        position 0), one after the other: what a restore reads of those older blocks, in one GET
        instead of PACK_BLOCKS. Per-request work dominates at these sizes (SeaweedFS and client
        on these two cores: the 34 objects of an 8k pull 32-38 ms, the same 33 MB in 4 objects
        23-27 ms). Content addressed like a block (its last block names the whole prefix), so it is
        written once whoever writes it; the heads stay in their own objects too (a pull of a
        context that ends inside a pack's span reads those), ~1/6 more bytes stored.
    s3://BUCKET/PREFIX/contexts/<agent_dirname>/<version:012d>.json
        one version of a context's manifest. A version key is written once, with a conditional put
        (`If-None-Match: *`): two nodes never overwrite each other's state, and the highest version is
        the context. A version is written only after every block it names is in the store, and an
        object PUT is atomic, so a node killed mid-upload leaves no torn manifest: at worst blocks
        that nothing names yet.

The client is obstore (Python bindings of Apache Arrow's Rust `object_store`, the storage layer of
DataFusion, Delta-rs and others): it speaks every S3-compatible server (SeaweedFS, MinIO, Ceph, R2),
its requests run in Rust without the GIL, and its per-request cost is a fraction of botocore's: a
resume GETs ~30 objects, and on this 2-core machine 30 770 KB GETs through 8 threads took 24 ms
with obstore and 62 ms with boto3 (its signing, endpoint rules and parsing in Python, ~1.4 ms of
CPU each). Endpoint and region come from `AWS_ENDPOINT_URL` and `AWS_REGION`; credentials from
boto3's session (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profiles, config files, instance
roles: the chain every AWS tool follows), handed to obstore through its boto3 credential provider.
boto3 also creates the bucket when it is missing (object_store does not manage buckets).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, NotFoundError, PreconditionError

from node.errors import ConfigError
from node.heap import freeze_long_lived
from node.memory.agent_ids import agent_dirname
from node.memory.checkpoint_format import is_block_key

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 30.0
RETRIES = 1  # a store that does not answer must not hold a restore for long (the node serves locally)
RETRY_TIMEOUT_S = 5.0


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

    def __init__(self, url: str) -> None:
        self.url = StoreUrl.parse(url)
        self._store = _object_store(self.url.bucket)

    # ---- keys ----------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.url.prefix, *parts) if p)

    def block_key(self, key: str, part: str = "safetensors") -> str:
        """The object of a block: its `head` or `rest`, or all of it (`safetensors`)."""
        return self._key("blocks", key[:2], f"{key}.{part}")

    def _version_key(self, agent_id: str, version: int) -> str:
        return self._key("contexts", agent_dirname(agent_id), f"{version:012d}.json")

    # ---- blocks --------------------------------------------------------------------------
    def has_block(self, key: str, split: bool = False) -> bool:
        return self._exists(self.block_key(key, "rest" if split else "safetensors"))

    def _exists(self, object_key: str) -> bool:
        try:
            self._call(obstore.head, self._store, object_key)
        except _Missing:
            return False
        return True

    def put_block(self, key: str, path: Path, head: int | None = None) -> int:
        """Upload a block file unless the store has it, as head and rest when `head` (the head's
        bytes) is given; returns the bytes sent (0: already there)."""
        split = head is not None
        if self.has_block(key, split):
            return 0
        body = memoryview(Path(path).read_bytes())
        parts = {"head": body[:head], "rest": body[head:]} if split else {"safetensors": body}
        for part, data in parts.items():  # the rest last: once it is there, the block is whole
            self._call(obstore.put, self._store, self.block_key(key, part), data)
        return len(body)

    def pack_key(self, last: str) -> str:
        return self._key("packs", last[:2], f"{last}.heads")

    def has_pack(self, last: str) -> bool:
        return self._exists(self.pack_key(last))

    def put_pack(self, last: str, heads: list) -> int:
        """Upload the heads of a pack's blocks (in order) as one object unless the store has it;
        returns the bytes sent."""
        if self.has_pack(last):
            return 0
        body = b"".join(heads)
        self._call(obstore.put, self._store, self.pack_key(last), body)
        return len(body)

    def read_pack(self, last: str):
        """A pack's bytes in memory (a buffer), or None if it is absent."""
        return self.read(self.pack_key(last))

    def delete_pack(self, last: str) -> None:
        self._call(obstore.delete, self._store, self.pack_key(last))

    def read_block(self, key: str, split: bool, head_only: bool = False) -> list | None:
        """A block's bytes in memory (its objects' buffers in order, for the caller to verify):
        all of it, or of a block stored as head and rest (`split`) its head alone; None if absent."""
        parts = []
        for name in self.block_objects(key, split, head_only):
            part = self.read(name)
            if part is None:
                return None
            parts.append(part)
        return parts

    def block_objects(self, key: str, split: bool, head_only: bool = False) -> list[str]:
        """The objects holding a block (`split`: stored as head and rest), or its head alone."""
        if head_only and not split:
            raise ValueError(f"block {key} is stored whole: it has no head object")
        parts = ("head",) if head_only else ("head", "rest") if split else ("safetensors",)
        return [self.block_key(key, part) for part in parts]

    def read_rest(self, key: str):
        """The rest of a block stored as head and rest, in memory; None if absent."""
        return self.read(self.block_key(key, "rest"))

    def get_rest(self, key: str, target: Path) -> int | None:
        """Append the rest of a block to `target`, which holds its head: the `rest` object, or for
        a block stored whole (uploaded before heads and rests were apart) a ranged GET."""
        got = self._get(self.block_key(key, "rest"), target, "ab")
        if got is None:
            got = self._get(self.block_key(key), target, "ab", first=target.stat().st_size)
        return got

    def delete_block(self, key: str) -> None:
        for part in ("rest", "head", "safetensors"):
            self._call(obstore.delete, self._store, self.block_key(key, part))

    def _get(self, object_key: str, target: Path, mode: str, first: int = 0) -> int | None:
        data = self.read(object_key, first)
        if data is None:
            return None
        with Path(target).open(mode) as handle:
            return handle.write(data)

    def read(self, object_key: str, first: int = 0):
        """An object's bytes (from offset `first`) in memory, as obstore's buffer; None if it is
        absent."""
        options = {"range": {"offset": first}} if first else None
        try:
            return self._call(lambda: obstore.get(self._store, object_key, options=options).bytes())
        except _Missing:
            return None

    # ---- manifests -----------------------------------------------------------------------
    def versions(self, agent_id: str) -> list[int]:
        prefix = self._key("contexts", agent_dirname(agent_id)) + "/"
        try:
            listed = self._call(lambda: obstore.list(self._store, prefix=prefix).collect())
        except _Missing:  # no bucket yet: no versions
            return []
        names = (item["path"][len(prefix) :].removesuffix(".json") for item in listed)
        return sorted(int(name) for name in names if name.isdigit())

    def latest_manifest(self, agent_id: str, versions: list[int] | None = None) -> dict | None:
        """The highest well-formed version of a context's manifest (its `version` field set), or
        None; `versions`: the context's versions when the caller listed them already."""
        for version in reversed(self.versions(agent_id) if versions is None else versions):
            manifest = self.manifest(agent_id, version)
            if manifest is not None:
                return manifest
        return None

    def manifest(self, agent_id: str, version: int) -> dict | None:
        body = self.read(self._version_key(agent_id, version))
        if body is None:
            return None
        try:
            manifest = json.loads(bytes(body))
        except ValueError:
            return None  # not ours to trust; an older version still may be
        if not _well_formed(manifest, agent_id):
            logger.warning("%s: version %d of context %r is malformed: ignored", self.url, version, agent_id)
            return None
        manifest["version"] = version
        return manifest

    def put_manifest(self, agent_id: str, version: int, manifest: dict) -> bool:
        """Write version `version` if no one has; False when that version exists already."""
        body = json.dumps({**manifest, "version": version}).encode()
        try:
            self._call(obstore.put, self._store, self._version_key(agent_id, version), body, mode="create")
        except _Conflict:
            return False
        return True

    def delete_versions(self, agent_id: str, versions: list[int]) -> None:
        for version in versions:
            self._call(obstore.delete, self._store, self._version_key(agent_id, version))

    def bytes_stored(self) -> dict:
        """Objects and bytes under the prefix, blocks and manifests apart (for `bench` and tools)."""
        totals = {
            "blocks": 0,
            "block_bytes": 0,
            "packs": 0,
            "pack_bytes": 0,
            "manifests": 0,
            "manifest_bytes": 0,
        }
        prefix = self._key()
        for item in self._call(lambda: obstore.list(self._store, prefix=prefix or None).collect()):
            path = f"/{item['path']}"
            kind = "blocks" if "/blocks/" in path else "packs" if "/packs/" in path else "manifests"
            totals[kind] += 1
            totals[kind.removesuffix("s") + "_bytes"] += item["size"]
        return totals

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (boto3: object_store does not manage buckets); also
        the uploader's probe of an unreachable store, so it costs one LIST when the bucket exists."""
        try:
            self._call(obstore.list_with_delimiter, self._store, prefix=self._key() or None)
            return
        except _Missing:
            pass
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            _bucket_client().create_bucket(Bucket=self.url.bucket)
        except ClientError as e:
            if _code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # a node beside
                raise StoreUnavailable(f"{self.url}: {e}") from e
        except BotoCoreError as e:
            raise StoreUnavailable(f"{self.url}: {e}") from e

    # ---- errors --------------------------------------------------------------------------
    def _call(self, function, *args, **kwargs):
        """Run one client call; map 'not found' and 'exists already' to local exceptions and
        everything the network or the server can do wrong to StoreUnavailable."""
        try:
            return function(*args, **kwargs)
        except (NotFoundError, FileNotFoundError) as e:  # obstore raises the builtin for objects
            raise _Missing(_first_line(e)) from e
        except (AlreadyExistsError, PreconditionError, FileExistsError) as e:
            raise _Conflict(_first_line(e)) from e
        except (BaseError, OSError) as e:
            if "<Code>NoSuchBucket</Code>" in str(e):  # S3's error code, in the body obstore quotes
                raise _Missing(_first_line(e)) from e
            raise StoreUnavailable(f"{self.url}: {_first_line(e)}") from e
        except BaseException as e:  # a panic in the Rust client (pyo3's PanicException)
            if type(e).__name__ != "PanicException":
                raise
            raise StoreUnavailable(f"{self.url}: the object store client failed: {_first_line(e)}") from e


class _Missing(StoreUnavailable):
    """Not found (an object, or the whole bucket: then the store cannot take uploads yet)."""


class _Conflict(Exception):
    pass


def _well_formed(manifest: object, agent_id: str) -> bool:
    """A manifest from the store names this context, block keys that are safe file names and
    integer positions (anyone with write access to the bucket could have written it)."""
    if not isinstance(manifest, dict) or manifest.get("agent_id") != agent_id:
        return False
    blocks, count = manifest.get("blocks"), manifest.get("token_count")
    if not isinstance(blocks, list) or not isinstance(count, int):
        return False
    if not isinstance(manifest.get("updated"), (int, float)):
        return False
    fields = ("start", "length", "split")
    return all(
        isinstance(ref, dict)
        and is_block_key(ref.get("key"))
        and all(isinstance(ref.get(name, 0), int) and ref.get(name, 0) >= 0 for name in fields)
        for ref in blocks
    )


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _session():
    import boto3

    return boto3.session.Session()


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _object_store(bucket: str):
    """An obstore S3 store for the bucket from the standard variables, credentials from boto3's
    chain (none found: unsigned requests, as to a server without identities), short connect
    timeouts and one retry."""
    from obstore.store import S3Store

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    parts = urlsplit(endpoint or "")
    if endpoint and not (parts.scheme in ("http", "https") and parts.hostname):
        raise ConfigError(f"AWS_ENDPOINT_URL is http(s)://HOST[:PORT], not {endpoint!r}")
    config: dict = {"region": _region()}
    provider = None
    if endpoint:
        config["endpoint"] = endpoint
        config["virtual_hosted_style_request"] = False  # path style, as S3-compatible servers expect
    session = _session()
    if session.get_credentials() is None:
        config["skip_signature"] = True
    else:
        from obstore.auth.boto3 import Boto3CredentialProvider

        provider = Boto3CredentialProvider(session)
    freeze_long_lived()  # boto3's objects (`node.heap`)
    return S3Store(
        bucket,
        config=config,
        credential_provider=provider,
        client_options={
            "allow_http": parts.scheme == "http",
            "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT_S),
            "timeout": timedelta(seconds=REQUEST_TIMEOUT_S),
        },
        retry_config={"max_retries": RETRIES, "retry_timeout": timedelta(seconds=RETRY_TIMEOUT_S)},
    )


def _bucket_client():
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=REQUEST_TIMEOUT_S,
        retries={"max_attempts": RETRIES + 1, "mode": "standard"},
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",  # servers without the newer checksums
        response_checksum_validation="when_required",
    )
    return _session().client(
        "s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, region_name=_region(), config=config
    )
