"""`python -m node cache {ls,show,verify,rm}`: inspect and manage agent checkpoints."""

from __future__ import annotations

import argparse
import json
import time

from node.config import NodeConfig
from node.errors import CheckpointError
from node.memory.agent_ids import validate_agent_id


def _store(config: NodeConfig, fingerprint: str | None = None):
    from node.memory.checkpoint import CheckpointStore

    return CheckpointStore(config.cache_dir, fingerprint)


def _summary(manifest: dict) -> dict:
    return {
        "agent_id": manifest.get("agent_id"),
        "tokens": manifest.get("token_count"),
        "segments": len(manifest.get("segments", [])),
        "bytes_on_disk": manifest.get("bytes_on_disk"),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.get("updated", 0))),
        "model_fingerprint": manifest.get("model_fingerprint"),
        "path": manifest.get("path"),
    }


def cache_ls(args: argparse.Namespace, config: NodeConfig) -> int:
    rows = [_summary(m) for m in _store(config).list_agents()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'AGENT':40} {'TOKENS':>8} {'SEGS':>5} {'BYTES':>12}  UPDATED")
    for row in rows:
        print(
            f"{row['agent_id']!s:40} {row['tokens']:>8} {row['segments']:>5} {row['bytes_on_disk']:>12}  {row['updated']}"
        )
    return 0


def cache_show(args: argparse.Namespace, config: NodeConfig) -> int:
    store = _store(config)
    manifest = store.manifest(validate_agent_id(args.agent_id))
    if manifest is None:
        print(f"no checkpoint for agent {args.agent_id!r}")
        return 1
    manifest["bytes_on_disk"] = store.bytes_on_disk(args.agent_id)
    manifest["path"] = str(store.agent_dir(args.agent_id))
    for segment in manifest["segments"]:
        segment.pop("digests", None)
    print(json.dumps(manifest, indent=1))
    return 0


def cache_verify(args: argparse.Namespace, config: NodeConfig, progress) -> int:
    from node.model.engine import model_fingerprint
    from node.model.spec import resolve_model_folder

    store = _store(config, model_fingerprint(resolve_model_folder(config.model, progress)))
    failures = 0
    for manifest in store.list_agents():
        agent_id = manifest.get("agent_id")
        try:
            store.verify(agent_id)
            print(f"ok      {agent_id} ({manifest['token_count']} tokens)")
        except (CheckpointError, TypeError) as e:
            failures += 1
            print(f"FAILED  {agent_id}: {e}")
    return 1 if failures else 0


def cache_rm(args: argparse.Namespace, config: NodeConfig) -> int:
    if not _store(config).delete(validate_agent_id(args.agent_id)):
        print(f"no checkpoint for agent {args.agent_id!r}")
        return 1
    print(f"removed {args.agent_id}")
    return 0


def run_cache(args: argparse.Namespace, config: NodeConfig, progress) -> int:
    if args.cache_command == "verify":
        return cache_verify(args, config, progress)
    handlers = {"ls": cache_ls, "show": cache_show, "rm": cache_rm}
    return handlers[args.cache_command](args, config)


def add_parser(commands, add_model_flags) -> None:
    parser = commands.add_parser("cache", help="list, show, verify or remove agent checkpoints")
    sub = parser.add_subparsers(dest="cache_command", required=True)
    ls = sub.add_parser("ls", help="list checkpoints")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="show one agent's manifest")
    show.add_argument("agent_id")
    verify = sub.add_parser("verify", help="check every checkpoint's digests and model fingerprint")
    rm = sub.add_parser("rm", help="delete one agent's checkpoint")
    rm.add_argument("agent_id")
    for p in (ls, show, verify, rm):
        add_model_flags(p)
