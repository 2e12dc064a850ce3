"""The demo's terminal report: plain text, one section per step, numbers in aligned columns."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import httpx

from node.memory.checkpoint import CheckpointStore

WIDTH = 100


def out(line: str = "") -> None:
    print(line, flush=True)


def title(root: Path, nodes) -> None:
    out("=" * WIDTH)
    out("Persistent-agent network demo: real node processes on loopback, Gemma 3 270M on this CPU")
    out("=" * WIDTH)
    for node in nodes:
        out(f"  node {node.name}  {node.url}  serve {' '.join(node.flags)}")
    out(f"  caches and logs under {root}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out(f"  load average {load:.1f} on {os.cpu_count()} cores (timings scale with it)")


def section(name: str) -> None:
    out()
    out(f"--- {name} " + "-" * max(0, WIDTH - len(name) - 5))


def startup(seconds: dict[str, float]) -> None:
    ready = ", ".join(f"node {name} ready in {s:.1f} s" for name, s in seconds.items())
    out(f"  {ready} (model load + each skill's playbook prefilled or restored)")


def base_contexts(health: dict[str, dict]) -> None:
    """Each skill's playbook (its base context): prefilled on a first start, restored after."""
    for name, body in health.items():
        for skill, base in body.get("base_contexts", {}).items():
            how = "restored from disk" if base["restored_tokens"] >= base["tokens"] else "prefilled"
            out(
                f"  node {name} {skill}: playbook of {base['tokens']} tokens {how} in {base['seconds']:.2f} s"
            )


def members(found: list[dict], names: dict[str, str]) -> None:
    listed = "; ".join(f"{names.get(m['url'], m['url'])}: {', '.join(m['skills'])}" for m in found)
    out(f"  registry (node A) members: {listed}")


def _tokens(usage: dict, key: str) -> int:
    return int(usage.get(key, 0))


def turns(turns) -> None:
    out(
        f"  {'agent':<20}{'node':<6}{'prompt':>7}{'cached':>8}{'prefill':>9}{'prefill s':>11}"
        f"{'restore s':>11}{'gen':>5}{'gen s':>7}{'tok/s':>7}{'wall s':>8}"
    )
    for t in turns:
        u = t.usage
        generated, generate_s = _tokens(u, "generatedTokens"), u.get("generateSeconds", 0)
        rate = generated / generate_s if generate_s else 0.0
        out(
            f"  {t.agent:<20}{t.node:<6}{_tokens(u, 'promptTokens'):>7}{_tokens(u, 'cachedTokens'):>8}"
            f"{_tokens(u, 'prefilledTokens'):>9}{u.get('prefillSeconds', 0):>11.2f}{u.get('restoreSeconds', 0):>11.3f}"
            f"{generated:>5}{generate_s:>7.1f}{rate:>7.1f}{t.wall_s:>8.1f}"
        )
    for t in turns:
        answer(t.agent, t.text)


def answer(agent: str, text: str) -> None:
    """The agent's whole answer, wrapped."""
    out(f"    {agent}:")
    flat = " ".join(text.split()) or "(no answer)"
    for line in textwrap.wrap(flat, WIDTH - 6):
        out(f"      {line}")


def resume_table(first: dict, resumed: dict, cold: dict) -> None:
    section("Restore vs cold prefill (session 2; the cold run is a new context given the same brief)")
    out(
        f"  {'agent':<20}{'restored tokens':>16}{'restore s':>11}{'| cold prefill tokens':>22}"
        f"{'prefill s':>11}{'| speed-up':>11}"
    )
    for agent, turn in resumed.items():
        u, c = turn.usage, cold[agent].usage
        restore_s, prefill_s = u.get("restoreSeconds", 0.0), c.get("prefillSeconds", 0.0)
        speedup = f"{prefill_s / restore_s:.0f}x" if restore_s > 0 else "n/a"
        out(
            f"  {agent:<20}{_tokens(u, 'cachedTokens'):>16}{restore_s:>11.3f}"
            f"{_tokens(c, 'prefilledTokens'):>22}{prefill_s:>11.2f}{speedup:>11}"
        )
    out("  restored = the whole conversation so far (brief, question, answer) read from the checkpoint;")
    out("  cold = the same brief in a new context, marked so that no stored conversation shares it,")
    out("         prefilled from scratch after the skill's cached playbook.")
    first_prefill = ", ".join(f"{a} {t.usage.get('prefillSeconds', 0):.2f} s" for a, t in first.items())
    out(f"  (session 1 cold prefills of the first turn: {first_prefill})")


def delegation(turn, names: dict[str, str]) -> None:
    report = turn.delegation or {}
    out(f"  request: coordination on node {turn.node}, wall {turn.wall_s:.1f} s")
    out(f"  {'sub-task':<20}{'answered by':<34}{'s':>6}{'prompt':>8}{'cached':>8}{'gen':>5}  attempts")
    for sub in report.get("subtasks", []):
        peer = sub.get("peer")
        who = f"{names.get(peer, peer)} ({peer})" if peer else "MISSING"
        u = sub.get("usage") or {}
        tries = (
            ", ".join(f"{names.get(a['peer'], a['peer'])}: {a['outcome']}" for a in sub["attempts"]) or "none"
        )
        out(
            f"  {sub['skill']:<20}{who:<34}{sub['elapsedSeconds']:>6.1f}{_tokens(u, 'promptTokens'):>8}"
            f"{_tokens(u, 'cachedTokens'):>8}{_tokens(u, 'generatedTokens'):>5}  {tries}"
        )
    u = turn.usage
    out(
        f"  synthesis on node {turn.node} (its own persistent context): prompt {_tokens(u, 'promptTokens')}, "
        f"cached {_tokens(u, 'cachedTokens')}, generated {_tokens(u, 'generatedTokens')}, "
        f"{u.get('prefillSeconds', 0) + u.get('generateSeconds', 0):.1f} s"
    )
    if report.get("missing"):
        out(f"  missing: {', '.join(report['missing'])}")
    out(f"  delegation total {report.get('elapsedSeconds', 0):.1f} s")
    answer("coordination", turn.text)


async def caches(nodes, labels: dict[str, str]) -> None:
    section("Where the caches live")
    async with httpx.AsyncClient(timeout=10) as http:
        for node in nodes:
            stats = (await http.get(f"{node.url}/agents")).json()
            store = CheckpointStore(node.cache_dir, None)
            usage = store.usage()
            out(
                f"  node {node.name}: {node.cache_dir}  ({usage['contexts']} contexts in {usage['blocks']} KV "
                f"blocks, {_mb(usage['bytes'])} on disk; {_mb(usage['bytes_if_unshared'])} if each stored "
                "its own prefix)"
            )
            for manifest in store.list_agents():
                agent_id = manifest.get("agent_id") or "?"
                live = stats.get("agents", {}).get(agent_id, {})
                restores = f", restored {live['restores']}x" if live.get("restores") else ""
                label = labels.get(agent_id, "pinned playbook" if manifest.get("pinned") else "")
                tokens, size = int(manifest.get("token_count", 0)), manifest["bytes_on_disk"]
                out(f"    {agent_id:<50}{tokens:>5} tokens {_mb(size):>8}  {label}{restores}")
            registry = node.cache_dir / "registry.sqlite"
            if registry.exists():
                out(f"    registry members: {registry} ({registry.stat().st_size / 1024:.0f} KB)")


def footer(wall_s: float, root: Path) -> None:
    section("Done")
    out(f"  demo wall time {wall_s:.0f} s; all node processes stopped; caches kept in {root}")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
