"""`python -m node cache {ls,show,verify,du,gc,rm}`: inspect and manage stored agent contexts.

Reading (ls, show, verify, du) works while a node serves the folder; changing it (gc, rm) takes
the folder's lock, so it is refused while a node serves it (that node owns its contexts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from node.config import NodeConfig
from node.errors import CacheLocked, CheckpointError
from node.memory.agent_ids import validate_agent_id


def _store(config: NodeConfig, fingerprint: str | None = None):
    from node.memory.checkpoint import CheckpointStore

    return CheckpointStore(config.cache_dir, fingerprint, storage=config.kv_storage)


def _summary(manifest: dict) -> dict:
    return {
        "agent_id": manifest.get("agent_id"),
        "tokens": manifest.get("token_count"),
        "blocks": manifest.get("blocks_count"),
        "bytes_on_disk": manifest.get("bytes_on_disk"),
        "pinned": bool(manifest.get("pinned")),
        "used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.get("used") or 0)),
        "model_fingerprint": manifest.get("model_fingerprint"),
        "path": manifest.get("path"),
    }


def cache_ls(args: argparse.Namespace, config: NodeConfig) -> int:
    rows = [_summary(m) for m in _store(config).list_agents()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'AGENT':48} {'TOKENS':>8} {'BLOCKS':>6} {'BYTES':>12}  LAST USED")
    for row in rows:
        pinned = "  (pinned)" if row["pinned"] else ""
        print(
            f"{row['agent_id']!s:48} {row['tokens']!s:>8} {row['blocks']!s:>6} {row['bytes_on_disk']!s:>12}  "
            f"{row['used']}{pinned}"
        )
    return 0


def cache_show(args: argparse.Namespace, config: NodeConfig) -> int:
    store = _store(config)
    manifest = store.manifest(validate_agent_id(args.agent_id))
    if manifest is None:
        print(f"no context for agent {args.agent_id!r}")
        return 1
    manifest["bytes_on_disk"] = store.bytes_on_disk(args.agent_id)
    manifest["path"] = str(store.manifest_path(args.agent_id))
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
            store.manifest(agent_id)
            store.verify(agent_id)
            print(f"ok      {agent_id} ({manifest['token_count']} tokens)")
        except (CheckpointError, TypeError) as e:
            failures += 1
            print(f"FAILED  {agent_id}: {e}")
    return 1 if failures else 0


def cache_du(args: argparse.Namespace, config: NodeConfig) -> int:
    usage = _store(config).usage()
    if args.json:
        print(json.dumps(usage, indent=1))
        return 0
    shared = usage["bytes_if_unshared"] / usage["bytes"] if usage["bytes"] else 1.0
    print(
        f"{usage['root']}: {usage['contexts']} contexts ({usage['pinned']} pinned), {usage['tokens']} tokens"
    )
    print(f"  {usage['blocks']} blocks, {usage['bytes'] / 1e6:.1f} MB on disk")
    print(f"  {usage['bytes_if_unshared'] / 1e6:.1f} MB if every context stored its own copy ({shared:.1f}x)")
    if usage["legacy_checkpoints"]:
        print(f"  {usage['legacy_checkpoints']} format-1 checkpoints in agents/ are no longer read")
    return 0


def _locked_store(config: NodeConfig):
    store = _store(config)
    store.open_for_serving()
    return store


def cache_gc(args: argparse.Namespace, config: NodeConfig) -> int:
    """Delete blocks nothing references, and contexts beyond the disk budget (least recently used)."""
    from node.config import disk_budget_for

    store = _locked_store(config)
    try:
        freed = store.collect_garbage()
        store.disk_budget_bytes = config.disk_budget_bytes or disk_budget_for(config.cache_dir)
        evicted = store.enforce_budget()
    finally:
        store.close()
    print(f"freed {freed} bytes of unreferenced blocks; evicted {len(evicted)} contexts over the disk budget")
    return 0


def cache_rm(args: argparse.Namespace, config: NodeConfig) -> int:
    store = _locked_store(config)
    try:
        removed = store.delete(validate_agent_id(args.agent_id))
    finally:
        store.close()
    if not removed:
        print(f"no context for agent {args.agent_id!r}")
        return 1
    print(f"removed {args.agent_id}")
    return 0


def run_cache(args: argparse.Namespace, config: NodeConfig, progress) -> int:
    if args.cache_command == "verify":
        return cache_verify(args, config, progress)
    handlers = {"ls": cache_ls, "show": cache_show, "du": cache_du, "gc": cache_gc, "rm": cache_rm}
    try:
        return handlers[args.cache_command](args, config)
    except CacheLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def add_parser(commands, add_model_flags) -> None:
    parser = commands.add_parser(
        "cache", help="list, show, verify, measure, collect or remove agent contexts"
    )
    sub = parser.add_subparsers(dest="cache_command", required=True)
    ls = sub.add_parser("ls", help="list contexts")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="show one agent's manifest")
    show.add_argument("agent_id")
    verify = sub.add_parser("verify", help="check every context's blocks, digests and model fingerprint")
    du = sub.add_parser("du", help="bytes on disk, blocks, and what sharing saves")
    du.add_argument("--json", action="store_true")
    gc = sub.add_parser("gc", help="delete unreferenced blocks and contexts over --disk-budget")
    rm = sub.add_parser("rm", help="delete one agent's context (its blocks go once nothing references them)")
    rm.add_argument("agent_id")
    for p in (ls, show, verify, du, gc, rm):
        add_model_flags(p)
    gc.add_argument("--disk-budget", dest="disk_budget_bytes", type=int, default=None, help="bytes")
