"""Two real processes in a row are two sessions of one agent (the default model, real CLI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from node.memory.checkpoint import CheckpointStore
from node.runtime.generation import CachedContext, SamplingParams, generate

pytestmark = pytest.mark.slow

REPORT = (
    "Quarterly engineering report, section {i}. The storage team migrated {i} services to the new "
    "replicated log, cutting p99 write latency from {a} ms to {b} ms. Open risks: capacity planning "
    "for region {i}, the on-call rotation, and the deprecation of the legacy billing API. "
)


def long_context() -> str:
    return "".join(REPORT.format(i=i, a=40 + i, b=12 + i % 7) for i in range(36))


def run_cli(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "node", "generate", *args, "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_resumes_agent_from_disk(engine, tmp_path):
    cache = str(tmp_path / "caches")
    first = run_cli(long_context(), "--agent", "analyst", "--max-tokens", "4", "--cache-dir", cache)
    assert first["usage"]["prompt_tokens"] > 1800 and first["usage"]["cached_tokens"] == 0

    store = CheckpointStore(tmp_path / "caches", engine.info.fingerprint)
    history = store.tokens("analyst")
    unfed = store.manifest("analyst")["metadata"]["unfed_tokens"]
    question = " Summary of the biggest risk:"
    second = run_cli(question, "--agent", "analyst", "--max-tokens", "8", "--cache-dir", cache)
    usage = second["usage"]
    new_tokens = len(unfed) + len(engine.encode(question, add_bos=False))
    assert usage["cached_tokens"] == len(history) >= first["usage"]["prompt_tokens"]
    assert usage["prefilled_tokens"] == new_tokens
    assert usage["restore_s"] < usage["prefill_s"] + 1.0

    full_prompt = history + unfed + engine.encode(question, add_bos=False)
    cold = generate(engine, CachedContext(engine.make_caches()), full_prompt, SamplingParams(max_tokens=8))
    assert second["text"] == cold.text
