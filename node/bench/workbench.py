"""The state one bench run shares between scenarios: the engine, folders, contexts, subprocesses.

Contexts are built once per size (one cold prefill each, checkpointed through the real
`AgentManager`) and reused by every scenario that needs them, which is what keeps `--quick` within
its time budget on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from node.bench import corpus
from node.bench.profile import BenchOptions, Profile
from node.errors import BenchError

Say = Callable[[str], None]


class Bench:
    def __init__(self, engine, options: BenchOptions, work_dir: Path, say: Say) -> None:
        self.engine = engine
        self.options = options
        self.work_dir = Path(work_dir)
        self.say = say
        self.shared: dict = {}  # figures one scenario leaves for a later one (e.g. the peer)
        self._contexts: dict[int, dict] = {}
        self._manager = None

    @property
    def profile(self) -> Profile:
        return self.options.profile

    # ---- checkpointed contexts -----------------------------------------------------------
    @property
    def contexts_dir(self) -> Path:
        return self.work_dir / "contexts"

    async def contexts_manager(self):
        if self._manager is None:
            self._manager = await self.new_manager("contexts")
        return self._manager

    async def new_manager(self, name: str):
        from node.memory.agents import AgentManager

        return await AgentManager.start(self.engine, self.work_dir / name)

    async def context(self, size: int) -> dict:
        """Agent `ctx-<size>` holding `size` tokens: built (cold prefill + checkpoint) once per run."""
        if size not in self._contexts:
            self._contexts[size] = await self._build_context(size)
        return self._contexts[size]

    async def _build_context(self, size: int) -> dict:
        from node.runtime.events import Completion, PrefillProgress
        from node.runtime.generation import SamplingParams

        manager = await self.contexts_manager()
        agent_id, prompt = f"ctx-{size}", corpus.tokens(self.engine, size)
        self.say(f"cold prefill of {size} tokens (agent {agent_id}) ...")
        reported, completion = 0, None
        unfed = lambda done: {"unfed_tokens": list(done.token_ids[-1:])}
        async for item in manager.stream(agent_id, prompt, SamplingParams(max_tokens=1), metadata=unfed):
            match item:
                case PrefillProgress(done=done, total=total) if done - reported >= 2048 and done < total:
                    reported = done
                    self.say(f"  prefilled {done}/{total}")
                case Completion():
                    completion = item
        await manager.flush()  # the checkpoint is committed (and timed) by the writer thread
        stats = manager.stats()["agents"][agent_id]
        figures = {
            "agent_id": agent_id,
            "tokens": size,
            "prompt": prompt,
            "unfed_tokens": list(completion.token_ids[-1:]),
            "prefill_s": completion.usage.prefill_s,  # time to first token: prefill + one forward step
            "checkpoint_s": stats["checkpoint_s"],
            "bytes_on_disk": manager.store.bytes_on_disk(agent_id),
        }
        self.say(
            f"  {size} tokens: prefill {figures['prefill_s']:.2f} s, first checkpoint {figures['checkpoint_s'] * 1000:.1f} ms"
        )
        return figures

    # ---- subprocesses --------------------------------------------------------------------
    def child_env(self, **overrides: str) -> dict:
        env = {**os.environ, **self.options.extra_env}
        if self.options.model_cache is not None:
            env["NODE_MODEL_CACHE"] = str(self.options.model_cache)
        env.update(overrides)
        return env

    def run_json(self, argv: list[str], *, env: dict | None = None, timeout: float = 1800) -> dict:
        """Run `python <argv>` and return the JSON object its last stdout line holds."""
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.child_env(),
            check=False,
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            tail = (done.stderr or done.stdout).strip()[-1500:]
            raise BenchError(f"`python {' '.join(argv[:3])} ...` exited with {done.returncode}: {tail}")
        try:
            result = json.loads(lines[-1])
        except ValueError as e:
            raise BenchError(f"`python {' '.join(argv[:3])} ...` printed no JSON: {lines[-1][:300]}") from e
        result.setdefault("process_wall_s", round(time.perf_counter() - started, 3))
        return result

    def run_worker(self, *args: str, env: dict | None = None) -> dict:
        return self.run_json(["-m", "node.bench.worker", *args, "--model", self.options.model], env=env)

    async def close(self) -> None:
        if self._manager is not None:
            await self._manager.close()
            self._manager = None
