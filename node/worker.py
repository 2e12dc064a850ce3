"""The one thread that owns MLX state: the model and every live cache.

Async code hands it work and awaits the result; nothing else touches MLX arrays. If the worker is
shut down or broken, calls fail at once with `WorkerDead` instead of hanging.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from node.errors import WorkerDead


class ModelWorker:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-owner")
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._closed:
            raise WorkerDead("the model worker has been shut down")
        try:
            return self._executor.submit(fn, *args)
        except RuntimeError as e:
            raise WorkerDead(f"the model worker cannot take work: {e}") from e

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True)
