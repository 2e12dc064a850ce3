"""How an A2A turn's answer streams: text deltas gathered into chunks of one artifact, every chunk
after the first appended, the last one marked (node.a2a.executor.TaskOutput)."""

from __future__ import annotations

import pytest

from node.a2a.executor import TaskOutput


class RecordingUpdater:
    """Stands in for the SDK's TaskUpdater: keeps each artifact chunk as it would be sent."""

    def __init__(self) -> None:
        self.chunks: list[dict] = []

    async def add_artifact(self, parts, artifact_id=None, name=None, append=None, last_chunk=None) -> None:
        self.chunks.append({"text": parts[0].text, "id": artifact_id, "append": append, "last": last_chunk})


async def stream(deltas: list[tuple[float, str]], chunk_s: float) -> list[dict]:
    """Writes each (time, text) delta at its time on a clock the test sets, then closes."""
    now = [0.0]
    updater = RecordingUpdater()
    out = TaskOutput(updater, chunk_s, clock=lambda: now[0])
    for at, text in deltas:
        now[0] = at
        await out.write(text)
    await out.close()
    assert len({c["id"] for c in updater.chunks}) == 1
    return updater.chunks


DELTAS = [(0.0, "a"), (0.05, "b"), (0.12, "c"), (0.13, ""), (0.3, "d")]


async def test_deltas_are_gathered_for_the_chunk_interval():
    chunks = await stream(DELTAS, chunk_s=0.1)
    assert [c["text"] for c in chunks] == ["ab", "c", "d"]
    assert [c["append"] for c in chunks] == [False, True, True]
    assert [c["last"] for c in chunks] == [False, False, True]


async def test_a_zero_interval_sends_a_chunk_per_delta():
    chunks = await stream(DELTAS, chunk_s=0)
    assert [c["text"] for c in chunks] == ["a", "b", "c", "d"]
    assert [c["last"] for c in chunks] == [False, False, False, True]


@pytest.mark.parametrize("chunk_s", [0, 0.1])
async def test_an_empty_answer_still_ends_its_artifact(chunk_s):
    chunks = await stream([], chunk_s)
    assert chunks == [{"text": "", "id": chunks[0]["id"], "append": False, "last": True}]
