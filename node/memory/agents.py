"""Persistent agents: isolated KV caches restored from disk instead of recomputed.

`AgentManager` creates, restores, generates for, checkpoints and evicts agents. All MLX work runs on
the single `ModelWorker` thread; a per-agent asyncio lock keeps two tasks for one agent from
interleaving on its cache, while tasks for different agents queue for the worker independently.
Every task ends with a checkpoint: the worker plans it (copies out the new K/V rows) and the
`CheckpointWriter` thread writes it, so disk work never stalls other agents' decoding; eviction
(LRU, by `max_agents` and a memory budget that counts running tasks' growth) never loses context.

An agent without a checkpoint, or one whose own history shares less with a prompt than some
stored context does, starts from the longest stored prefix anywhere (`CheckpointStore.longest_prefix`):
a new conversation under a known system prompt or playbook reads it from disk, never re-prefills it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from node.errors import BlockStoreUnavailable, CheckpointCorrupt, CheckpointError, MemoryBudgetExceeded
from node.memory.agent_ids import validate_agent_id
from node.memory.checkpoint import CheckpointStore, Restored
from node.memory.cost_model import ObservedCosts
from node.memory.prefix_index import BlockRef
from node.memory.writer import CheckpointWriter
from node.model import kv_cache
from node.runtime.events import PrefillProgress, TextDelta
from node.runtime.generation import (
    CachedContext,
    Completion,
    SamplingParams,
    Sequence,
    prefill,
    reusable_prefix,
    rewind,
)
from node.runtime.prefix import common_prefix_length
from node.runtime.worker import ModelWorker

logger = logging.getLogger(__name__)
_DONE = object()
# A stored prefix elsewhere is restored instead of an agent's own cache when it covers this many
# more tokens: prefilling them costs more than reading a whole context's blocks (~40 ms at 8k).
TREE_ADVANTAGE_TOKENS = 32


@dataclass(frozen=True)
class AgentRequest:
    agent_id: str
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    base_agent: str | None = None


@dataclass
class AgentStats:
    tasks: int = 0
    restores: int = 0
    restore_s: float = 0.0
    prefill_tokens_avoided: int = 0
    prefilled_tokens: int = 0
    prefill_s: float = 0.0
    checkpoint_s: float = 0.0
    last_used: float = field(default_factory=time.time)


@dataclass
class Agent:
    agent_id: str
    context: CachedContext
    persisted: int = 0  # leading tokens whose K/V `stored` holds
    metadata: dict = field(default_factory=dict)
    stats: AgentStats = field(default_factory=AgentStats)
    busy: bool = False
    stored: tuple[BlockRef, ...] = ()  # the path of blocks its checkpoint names (its last maybe in part)
    pinned: bool = False
    scope: str | None = None  # who may start from its blocks: anyone (None) or requests of this scope
    reserved_bytes: int = 0  # growth of its caches the running task may still need


class AgentManager:
    def __init__(self, engine, store: CheckpointStore, max_agents: int, memory_budget_bytes: int) -> None:
        self.engine = engine
        self.store = store
        self.max_agents = max_agents
        self.memory_budget_bytes = memory_budget_bytes
        self._worker = ModelWorker(engine.model)
        self._writer = CheckpointWriter(store, model_busy=self._worker.busy)
        store.is_live = lambda agent_id: agent_id in self._agents
        self._agents: OrderedDict[str, Agent] = OrderedDict()
        # A lock lives while a task holds or awaits it (no map that grows with every agent id).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._snapshot: dict = {"agents": {}}
        self._prefill_rate = PrefillRate()
        self._costs = ObservedCosts()  # restore or recompute, from this node's own timings
        self._refused: list[dict] = []
        self.remote = None  # the shared block store's tier (`node.memory.sync.RemoteTier`), if any

    @classmethod
    async def start(
        cls,
        engine,
        cache_dir: Path,
        *,
        max_agents: int = 64,
        memory_budget_bytes: int = 4 << 30,
        disk_budget_bytes: int | None = None,
        kv_storage: str = "float16",
        block_store: str | None = None,
    ) -> AgentManager:
        """Open the cache folder for serving (an exclusive lock: `CacheLocked` if another process
        has it), clean up after a crash and index the stored contexts, off the event loop."""
        store = CheckpointStore(
            Path(cache_dir), engine.info.fingerprint, storage=kv_storage, disk_budget_bytes=disk_budget_bytes
        )
        await asyncio.to_thread(store.open_for_serving)
        manager = cls(engine, store, max_agents, memory_budget_bytes)
        if block_store is not None:
            manager.share_through(block_store)
        return manager

    def share_through(self, block_store: str) -> None:
        """Upload committed contexts to `block_store` (s3://BUCKET/PREFIX) and pull newer ones
        from it before use (`node.memory.sync`)."""
        from node.memory.remote_store import ObjectStore
        from node.memory.sync import RemoteTier, window_start

        self.remote = RemoteTier(
            self.store, ObjectStore(block_store), window_start=window_start(self.engine.make_caches())
        )
        self.store.on_commit = self.remote.enqueue

    # ---- public API ----------------------------------------------------------------------
    async def stream(
        self,
        agent_id: str,
        prompt: list[int],
        params: SamplingParams,
        *,
        base_agent: str | None = None,
        metadata: dict | Callable[[Completion], dict] | None = None,
        cancel: threading.Event | None = None,
        scope: str | None = None,
        text_deltas: bool = True,
    ) -> AsyncIterator[TextDelta | PrefillProgress | Completion]:
        """Run one task for `agent_id`, yielding progress, text and finally the Completion.

        `base_agent` names the context this agent grows from (a skill's playbook agent); it labels
        the task, while the cached prefix itself is found by content (`_acquire`). `scope`: the
        agent starts only from prefixes stored by contexts of no scope or of this one, and its own
        blocks serve only those (callers with different API keys learn nothing of each other).
        `text_deltas=False`: no TextDelta items (the Completion holds the text), so no event-loop
        wake-up per token competes with the decode for the GIL and the cores.
        """
        validate_agent_id(agent_id)
        if base_agent is not None:
            validate_agent_id(base_agent)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        abandoned = threading.Event()

        def emit(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def should_stop() -> bool:
            return abandoned.is_set() or (cancel is not None and cancel.is_set())

        done: Future = Future()
        done.add_done_callback(lambda _: emit(_DONE))
        async with self._lock(agent_id):
            await self._pull(agent_id)
            started = self._worker.submit(
                self._start_task, agent_id, prompt, params, metadata, should_stop, emit, done, scope, text_deltas
            )  # fmt: skip
            started.add_done_callback(
                lambda f: f.exception() and not done.done() and done.set_exception(f.exception())
            )
            try:
                while (item := await queue.get()) is not _DONE:
                    yield item
                yield await asyncio.wrap_future(done)
            finally:
                abandoned.set()

    async def generate(
        self, agent_id: str, prompt: list[int], params: SamplingParams, **kwargs
    ) -> Completion:
        result = None
        async for item in self.stream(agent_id, prompt, params, text_deltas=False, **kwargs):
            result = item
        return result

    async def generate_concurrent(self, requests: list[AgentRequest]) -> list[Completion]:
        """Run tasks for several agents at once; each agent's cache stays isolated."""
        return list(
            await asyncio.gather(
                *(self.generate(r.agent_id, r.prompt, r.params, base_agent=r.base_agent) for r in requests)
            )
        )

    async def ensure_prefix(self, agent_id: str, prompt: list[int], *, pinned: bool = False) -> int:
        """Make `agent_id` hold exactly `prompt` (prefilling and checkpointing as needed).

        `pinned`: the disk budget never evicts it (a skill's playbook every conversation starts from).
        """
        validate_agent_id(agent_id)
        async with self._lock(agent_id):
            return await self._worker.run(self._run_prefix, agent_id, prompt, pinned)

    async def metadata(self, agent_id: str) -> dict | None:
        validate_agent_id(agent_id)
        await self._pull(agent_id)
        agent = self._agents.get(agent_id)
        if agent is not None:
            return dict(agent.metadata)
        try:
            manifest = await asyncio.to_thread(self.store.manifest, agent_id)
        except CheckpointError:
            return None
        return None if manifest is None else manifest.get("metadata") or {}

    async def tokens(self, agent_id: str) -> list[int]:
        """The token ids an agent's context holds (empty for an unknown agent)."""
        validate_agent_id(agent_id)
        async with self._lock(agent_id):
            await self._pull(agent_id)
            return await self._worker.run(self._tokens, agent_id)

    async def delete(self, agent_id: str) -> bool:
        validate_agent_id(agent_id)
        async with self._lock(agent_id):
            return await self._worker.run(self._delete, agent_id)

    async def _pull(self, agent_id: str) -> None:
        """Take the shared store's version of a context first if it is newer than ours (a turn
        another node ran), off the event loop and off the model thread; a copy in memory is then
        stale and is dropped, so the task restores the newer one."""
        if self.remote is None:
            return
        await asyncio.to_thread(self._writer.wait, agent_id)
        if await asyncio.to_thread(self.remote.pull, agent_id) is not None and agent_id in self._agents:
            await self._worker.run(self._agents.pop, agent_id, None)

    def stats(self) -> dict:
        return {
            **self._snapshot,
            "block_store": None if self.remote is None else self.remote.status(),
            "on_disk": self.store.summary(),
            "checkpoint_writer": self._writer.stats(),
            "refused_checkpoints": list(self._refused),
            "batching": self._worker.stats(),
        }

    @property
    def worker(self) -> ModelWorker:
        return self._worker

    async def flush(self) -> None:
        """Wait until every checkpoint handed to the writer is on disk (or has failed)."""
        await asyncio.to_thread(self._writer.wait)

    async def close(self) -> None:
        await self._worker.run(self._save_all)
        self._worker.close()
        await asyncio.to_thread(self._writer.close)
        if self.remote is not None:
            await asyncio.to_thread(self.remote.close)
        self.store.close()

    def _lock(self, agent_id: str) -> asyncio.Lock:
        lock = self._locks.get(agent_id)
        if lock is None:
            lock = self._locks[agent_id] = asyncio.Lock()
        return lock

    # ---- worker-thread side --------------------------------------------------------------
    def _start_task(
        self, agent_id, prompt, params, metadata, should_stop, emit, done: Future, scope: str | None, text_deltas: bool
    ) -> None:  # fmt: skip
        """Prepare the agent's cache and hand the sequence to the worker's batch loop."""
        agent, restore_s = self._acquire(agent_id, prompt, scope)
        sequence = Sequence(
            self.engine,
            agent.context,
            prompt,
            params,
            on_text=(lambda text: emit(TextDelta(text))) if text_deltas else None,
            should_stop=should_stop,
            on_prefill=lambda done_tokens, total: emit(PrefillProgress(done_tokens, total)),
        )
        self.store.check_fits(
            len(prompt) + params.max_tokens - sequence.cached,
            self.store.bytes_per_token(len(agent.context.caches), self.engine.kv_values_per_position),
        )
        self._reserve(agent, len(prompt) + params.max_tokens)
        agent.busy = True

        def finished(result: Completion | BaseException) -> None:
            agent.busy, agent.reserved_bytes = False, 0
            try:
                if isinstance(result, BaseException):
                    raise result
                self._finish_task(agent, result, metadata, restore_s, done.set_result)
            except BaseException as e:  # noqa: BLE001 - delivered to the awaiting request
                done.set_exception(e)

        self._worker.add_sequence(sequence, finished)

    def _reserve(self, agent: Agent, final_tokens: int) -> None:
        """Count the task's cache growth against the memory budget, evicting idle agents for it."""
        needed = max(0, self.engine.kv_memory_bytes(final_tokens) - agent.context.nbytes)
        agent.reserved_bytes = needed
        self._evict(keep=agent.agent_id)
        in_use = self._bytes_in_memory()
        if in_use > self.memory_budget_bytes:
            agent.reserved_bytes = 0
            running = sum(1 for a in self._agents.values() if a.busy)
            raise MemoryBudgetExceeded(
                f"this request needs {needed} more bytes of KV cache; the memory budget is "
                f"{self.memory_budget_bytes} bytes and {in_use - needed} are held by {running} running "
                "tasks and the agents they use; retry later or send a shorter request"
            )

    def _finish_task(self, agent: Agent, completion: Completion, metadata, restore_s: float, deliver) -> None:
        """Checkpoint the task; `deliver` gets the completion once its checkpoint is on disk (a
        task the caller sees as done is never lost), from the writer thread, while this thread
        goes on decoding other agents."""
        agent.persisted = min(agent.persisted, completion.usage.cached_tokens)
        if metadata is not None:
            # A callable sees the completion, so the checkpoint can record the reply too.
            agent.metadata = metadata(completion) if callable(metadata) else metadata
        self._record(agent, completion)
        final = dataclasses.replace(
            completion, usage=dataclasses.replace(completion.usage, restore_s=round(restore_s, 4))
        )
        self._checkpoint(agent, lambda _: deliver(final))
        self._evict(keep=agent.agent_id)

    def _run_prefix(self, agent_id: str, prompt: list[int], pinned: bool) -> int:
        # The sentinel lets a restore reuse all of `prompt` (a generation must feed its last token).
        agent, _ = self._acquire(agent_id, prompt + [-1])
        context = agent.context
        cached = rewind(
            context,
            min(len(prompt), len(context.tokens), common_prefix_length(context.tokens, prompt)),
            self.engine.make_caches,
        )
        agent.persisted = min(agent.persisted, cached)
        prefill(self.engine.model, context, prompt[cached:])
        agent.pinned = pinned
        self._checkpoint(agent)
        self._evict(keep=agent_id)
        return cached

    def _acquire(self, agent_id: str, prompt: list[int], scope: str | None = None) -> tuple[Agent, float]:
        """The agent, holding the longest prefix of `prompt` it can get: its own history (in
        memory or on disk), or the longest prefix stored anywhere when that is clearly longer."""
        agent, restore_s = self._agents.get(agent_id), 0.0
        if agent is None or self._needs_disk_rewind(agent, prompt):
            self._writer.wait(agent_id)
            agent = self._restore(agent_id, prompt) or self._fresh(agent_id)
            restore_s = agent.stats.restore_s
        agent.scope = scope
        if not agent.busy:
            better = self._from_tree(agent, prompt, reusable_prefix(agent.context, prompt))
            if better is not None:
                agent, restore_s = better, better.stats.restore_s
        self._agents[agent_id] = agent
        self._agents.move_to_end(agent_id)
        agent.stats.last_used = time.time()
        return agent, restore_s

    def _needs_disk_rewind(self, agent: Agent, prompt: list[int]) -> bool:
        position = reusable_prefix(agent.context, prompt)
        return position < len(agent.context.tokens) and not kv_cache.can_trim_to(
            agent.context.caches, position
        )

    def _limit(self, prompt: list[int]):
        def position(saved: list[int]) -> int:
            return min(common_prefix_length(saved, prompt), max(len(prompt) - 1, 0))

        return position

    def _restore(self, agent_id: str, prompt: list[int]) -> Agent | None:
        """Load an agent from disk, at the longest prefix it shares with `prompt`."""
        try:
            if not self.store.exists(agent_id):
                return None
            restored = self._read_stored(agent_id, None, self._limit(prompt), len(prompt))
        except BlockStoreUnavailable:
            raise  # sound, only out of reach for now: the task fails and the context stays
        except CheckpointError as e:
            self._refuse(agent_id, e)
            return None
        if restored is None:  # prefilling the history is predicted faster: keep its metadata only
            agent = self._fresh(agent_id)
            agent.metadata = (self.store.manifest(agent_id) or {}).get("metadata") or {}
            return agent
        agent = self._restored_agent(agent_id, restored)
        agent.metadata = restored.metadata
        logger.info(
            "restored agent %r: %d tokens in %.1f ms", agent_id, len(restored.tokens), restored.seconds * 1000
        )
        return agent

    def _from_tree(self, agent: Agent, prompt: list[int], own: int) -> Agent | None:
        """The agent restarted from the longest prefix of `prompt` stored in any context, when
        that beats what its own cache can reuse by TREE_ADVANTAGE_TOKENS or more."""
        match = self.store.longest_prefix(prompt, agent.scope)
        usable = min(match.length, len(prompt) - 1)
        if usable < own + TREE_ADVANTAGE_TOKENS:
            return None
        if agent.persisted < len(agent.context.tokens):
            self._checkpoint(agent)
        restored = self._share_in_memory(agent, prompt, usable, match.path)
        if restored is None:
            if not all(self.store.blocks.exists(ref.key) for ref in match.path):
                self._writer.wait()  # blocks a queued save is still writing (not others' saves)
            try:
                restored = self._read_stored(None, match.path, lambda _: usable, len(prompt))
            except CheckpointCorrupt as e:
                self._refuse_block(e)
                return None
            if restored is None:
                return None
        fresh = self._restored_agent(agent.agent_id, restored)
        fresh.metadata, fresh.stats.tasks, fresh.scope = agent.metadata, agent.stats.tasks, agent.scope
        logger.info(
            "agent %r starts from %d tokens stored by %r (its own cache reused %d) in %.1f ms%s",
            agent.agent_id, usable, match.holder, own, restored.seconds * 1000,
            " (shared in memory)" if restored.metadata.get("shared") else "",
        )  # fmt: skip
        return fresh

    def _share_in_memory(self, agent: Agent, prompt: list[int], usable: int, path) -> Restored | None:
        """The first `usable` prompt tokens as views of an agent in memory that holds them: no
        disk read, and the arrays stay shared until one side writes (MLX copies on write)."""
        started = time.perf_counter()
        for other in self._agents.values():
            if other is agent or other.scope not in (None, agent.scope):
                continue
            if common_prefix_length(other.context.tokens, prompt) < usable:
                continue
            caches = kv_cache.prefix_views(other.context.caches, usable, self.engine.make_caches())
            if caches is not None:
                blocks = tuple(ref for ref in path if ref.start < usable)
                seconds = time.perf_counter() - started
                return Restored(list(prompt[:usable]), caches, {"shared": other.agent_id}, seconds, blocks)
        return None

    def _read_stored(self, agent_id: str | None, path, position, prompt_tokens: int):
        """A context (`agent_id`) or a path of blocks read back into caches, or None where
        recomputing the prompt is predicted faster. On the CPU the store decodes into fp32 caches
        (measured fastest there, and always far faster than prefill); on a GPU `device_restore`
        reads in parallel and converts on the device, in the model's dtype, when the node's own
        measurements (`ObservedCosts`) say reading the stored tokens beats prefilling them."""
        make = self.engine.make_caches
        if self.engine.info.backend == "cpu":
            if agent_id is not None:
                return self.store.restore(agent_id, make, position)
            return self.store.restore_path(path, make, position)
        from node.memory import device_restore

        def accept(plan) -> bool:
            choice = self._costs.choose(prompt_tokens, len(plan.tokens), plan.nbytes)
            if not choice.restore:
                logger.info(
                    "recomputing %d stored tokens: predicted %.0f ms against %.0f ms to read them",
                    len(plan.tokens), choice.estimated_s * 1000, choice.alternative_s * 1000,
                )  # fmt: skip
            return choice.restore

        dtype = getattr(mx, self.engine.info.dtype.rsplit(".", 1)[-1])  # "mlx.core.bfloat16" or "float32"
        options = {"landing": device_restore.best_landing(), "accept": accept}
        if agent_id is not None:
            restored = device_restore.restore(self.store, agent_id, make, dtype, position, **options)
        else:
            restored = device_restore.restore_path(self.store, list(path), make, dtype, position, **options)
        if restored is not None:
            self._costs.observe_restore(restored.phases.bytes_read, restored.seconds)
        return restored

    def _restored_agent(self, agent_id: str, restored) -> Agent:
        agent = Agent(agent_id, CachedContext(restored.caches, restored.tokens), len(restored.tokens))
        agent.stored = restored.blocks
        agent.stats.restores, agent.stats.restore_s = 1, restored.seconds
        return agent

    def _fresh(self, agent_id: str) -> Agent:
        return Agent(agent_id, CachedContext(self.engine.make_caches()))

    def _refuse(self, agent_id: str, error: CheckpointError) -> None:
        kept = self.store.quarantine(agent_id, str(error))
        self._refused.append({"agent_id": agent_id, "reason": str(error), "kept_in": str(kept)})

    def _refuse_block(self, error: CheckpointCorrupt) -> None:
        """A damaged block: set it and every context through it aside (each logged as refused)."""
        key = getattr(error, "block_key", None)
        if key is None:
            return
        holders = self.store.index().holders(key)
        self.store.quarantine_block(key, str(error))
        for holder in holders:
            if holder not in self._agents:
                self._refuse(holder, error)

    def _checkpoint(self, agent: Agent, then: Callable[[float | BaseException], None] | None = None) -> None:
        """Plan the agent's save here (the arrays' owner) and let the writer thread commit it;
        `then` runs on the writer thread once it is committed (or has failed: the agent keeps its
        context in memory and the writer retries with its next save)."""
        started = time.perf_counter()
        context = agent.context
        plan = self.store.plan(
            agent.agent_id, context.tokens, context.caches, agent.stored, agent.persisted, agent.metadata,
            pinned=agent.pinned, scope=agent.scope,
        )  # fmt: skip
        agent.stored, agent.persisted = tuple(plan.path), len(context.tokens)
        kv_cache.compact(context.caches)
        planned_s = time.perf_counter() - started

        def committed(result: float | BaseException) -> None:
            if not isinstance(result, BaseException):
                agent.stats.checkpoint_s = planned_s + result
                shown = self._snapshot.get("agents", {}).get(agent.agent_id)
                if shown is not None:  # the snapshot was taken at planning time
                    shown["checkpoint_s"] = round(agent.stats.checkpoint_s, 4)
            if then is not None:
                then(result)

        self._writer.submit(plan, committed)
        self._update_snapshot()

    def _record(self, agent: Agent, completion: Completion) -> None:
        usage, stats = completion.usage, agent.stats
        stats.tasks += 1
        stats.prefill_tokens_avoided += usage.cached_tokens
        stats.prefilled_tokens += usage.prefilled_tokens
        stats.prefill_s += usage.prefill_s
        self._prefill_rate.observe(usage.prefilled_tokens, usage.prefill_s)
        self._costs.observe_prefill(
            usage.cached_tokens, usage.cached_tokens + usage.prefilled_tokens, usage.prefill_s
        )

    def _evict(self, keep: str) -> None:
        while len(self._agents) > 1 and (
            len(self._agents) > self.max_agents or self._bytes_in_memory() > self.memory_budget_bytes
        ):
            victim_id = next((a for a, v in self._agents.items() if a != keep and not v.busy), None)
            if victim_id is None:
                break
            victim = self._agents[victim_id]
            if victim.persisted < len(victim.context.tokens):
                self._checkpoint(victim)  # saved (planned) before it leaves memory
            del self._agents[victim_id]
            logger.info("evicted agent %r from memory (%d tokens stay on disk)", victim_id, victim.persisted)
        self._update_snapshot()

    def _tokens(self, agent_id: str) -> list[int]:
        agent = self._agents.get(agent_id)
        if agent is not None:
            return list(agent.context.tokens)
        self._writer.wait(agent_id)
        try:
            return self.store.tokens(agent_id)
        except CheckpointError as e:
            self._refuse(agent_id, e)
            return []

    def _delete(self, agent_id: str) -> bool:
        in_memory = self._agents.pop(agent_id, None) is not None
        self._writer.wait(agent_id)
        on_disk = self.store.delete(agent_id)
        self._update_snapshot()
        return in_memory or on_disk

    def _save_all(self) -> None:
        for agent in self._agents.values():
            if agent.persisted < len(agent.context.tokens):
                self._checkpoint(agent)

    def _bytes_in_memory(self) -> int:
        return sum(agent.context.nbytes + agent.reserved_bytes for agent in self._agents.values())

    # ---- statistics ----------------------------------------------------------------------
    def _update_snapshot(self) -> None:
        seconds_per_token = self._prefill_rate.seconds_per_token()
        agents = {
            agent_id: _agent_summary(agent, seconds_per_token) for agent_id, agent in self._agents.items()
        }
        self._snapshot = {
            "model": self.engine.info.name,
            "agents_in_memory": len(agents),
            "bytes_in_memory": self._bytes_in_memory(),
            "bytes_reserved": sum(a.reserved_bytes for a in self._agents.values()),
            "memory_budget_bytes": self.memory_budget_bytes,
            "max_agents": self.max_agents,
            "tokens_cached": sum(a["tokens"] for a in agents.values()),
            "restores": sum(a["restores"] for a in agents.values()),
            "prefill_tokens_avoided": sum(a["prefill_tokens_avoided"] for a in agents.values()),
            "seconds_saved": round(sum(a["seconds_saved"] for a in agents.values()), 3),
            "agents": agents,
        }


class PrefillRate:
    """Running estimate of prefill cost per token, from tasks long enough to measure it."""

    MIN_TOKENS = 128

    def __init__(self) -> None:
        self.tokens, self.seconds = 0, 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens >= self.MIN_TOKENS:
            self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds

    def seconds_per_token(self) -> float:
        return self.seconds / self.tokens if self.tokens else 0.0


def _agent_summary(agent: Agent, rate: float) -> dict:
    stats = agent.stats
    return {
        "tokens": len(agent.context.tokens),
        "bytes_in_memory": agent.context.nbytes,
        "persisted_tokens": agent.persisted,
        "tasks": stats.tasks,
        "restores": stats.restores,
        "restore_s": round(stats.restore_s, 4),
        "checkpoint_s": round(stats.checkpoint_s, 4),
        "prefill_tokens_avoided": stats.prefill_tokens_avoided,
        "seconds_saved": max(0.0, stats.prefill_tokens_avoided * rate - stats.restore_s),
        "last_used": stats.last_used,
    }
