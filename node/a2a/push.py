"""Push notifications off the task's path: URLs screened, delivery queued, retried and bounded.

The SDK's `BasePushNotificationSender` POSTs every event inline, so a URL that never answers holds
the task's event stream for the client's whole timeout, once per event. `QueuedPushSender` takes
an event in O(1) and returns; one delivery worker per task sends that task's events in order, each
attempt within `ATTEMPT_TIMEOUT_S`, at most `ATTEMPTS` times; a destination that fails them all is
given up for the rest of that task. A task's queue holds at most `MAX_QUEUED` events (newer ones
are dropped with a warning).

`push_url_allowed` is the SDK's `validate_push_notification_url` (public unicast only), widened to
loopback (a local receiver; the node's outbound rule) and, with `--allow-private-peers`, to private
ranges; the handler applies it when a config is set, the sender again before each delivery (a
name may resolve elsewhere by then).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

import httpx
from a2a.server.tasks import BasePushNotificationSender, PushNotificationConfigStore
from a2a.server.tasks.push_notification_sender import PushNotificationEvent
from a2a.utils.push_url_validator import validate_push_notification_url

from node.network.outbound import GuardedTransport, OutboundRefused, check_destination

logger = logging.getLogger(__name__)
ATTEMPT_TIMEOUT_S = 5.0
ATTEMPTS = 3
BACKOFF_S = 0.5
MAX_QUEUED = 256
REMEMBERED_TASKS = 1000  # tasks whose given-up destinations are remembered


def push_url_check(allow_private: bool):
    async def push_url_allowed(url: str) -> bool:
        if await validate_push_notification_url(url):
            return True
        try:
            await check_destination(url, allow_private)
        except (OutboundRefused, httpx.HTTPError):
            return False
        return True

    return push_url_allowed


def push_client(allow_private: bool) -> httpx.AsyncClient:
    """No credentials, no redirects, the destination checked again when connecting, capped replies."""
    return httpx.AsyncClient(timeout=ATTEMPT_TIMEOUT_S, transport=GuardedTransport(allow_private))


class QueuedPushSender(BasePushNotificationSender):
    def __init__(self, client: httpx.AsyncClient, store: PushNotificationConfigStore, validator) -> None:
        super().__init__(client, store, push_url_validator=validator)
        self._queues: dict[str, collections.deque] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._given_up: collections.OrderedDict[str, set[str]] = collections.OrderedDict()

    async def send_notification(self, task_id: str, event: PushNotificationEvent) -> None:
        queue = self._queues.setdefault(task_id, collections.deque())
        if len(queue) >= MAX_QUEUED:
            logger.warning("push for task %s: %d events queued, dropping one", task_id, len(queue))
            return
        queue.append(event)
        if task_id not in self._workers:
            self._workers[task_id] = asyncio.create_task(self._deliver(task_id), name=f"push-{task_id}")

    async def _deliver(self, task_id: str) -> None:
        given_up = self._given_up.setdefault(task_id, set())
        while len(self._given_up) > REMEMBERED_TASKS:
            self._given_up.popitem(last=False)
        queue = self._queues[task_id]
        try:
            while queue:
                event = queue.popleft()
                try:
                    configs = await self._config_store.get_info_for_dispatch(task_id)
                except Exception:
                    logger.exception("push for task %s: cannot read its configs", task_id)
                    continue
                for config in configs:
                    if config.url not in given_up and not await self._send(event, config, task_id):
                        logger.warning("push for task %s: giving up on %s", task_id, config.url)
                        given_up.add(config.url)
        finally:
            self._workers.pop(task_id, None)
            if not queue:
                self._queues.pop(task_id, None)

    async def _send(self, event, config, task_id: str) -> bool:
        for attempt in range(ATTEMPTS):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
                    if await self._dispatch_notification(event, config, task_id):
                        return True
            await asyncio.sleep(BACKOFF_S * 2**attempt)
        return False

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def aclose(self) -> None:
        for worker in list(self._workers.values()):
            worker.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
