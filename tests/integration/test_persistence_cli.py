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
    full_prompt = history + unfed + engine.encode(question, add_bos=False)
    # What this process computes from the same checkpoint, before the second process extends it.
    restored = store.restore("analyst", engine.make_caches)
    here = generate(
        engine, CachedContext(restored.caches, restored.tokens), full_prompt, SamplingParams(max_tokens=8)
    )

    second = run_cli(question, "--agent", "analyst", "--max-tokens", "8", "--cache-dir", cache)
    usage = second["usage"]
    new_tokens = len(unfed) + len(engine.encode(question, add_bos=False))
    assert usage["cached_tokens"] == len(history) >= first["usage"]["prompt_tokens"]
    assert usage["prefilled_tokens"] == new_tokens
    assert usage["restore_s"] < usage["prefill_s"] + 1.0
    assert second["text"] == here.text  # the second process resumed exactly the stored state

    # Against a cold prefill of the whole prompt: the same context, so the same first token. Later
    # tokens may part at a near tie: the positions decoded in the first session went through the
    # decode step's kernels (fused attention inputs, decode attention), a cold prefill through the
    # prefill's (blocked causal attention, MLX's own operations), so their keys and values differ by
    # float rounding, which int8 activations (the VNNI path, as llama.cpp's Q8_0 products) amplify.
    cold = generate(engine, CachedContext(engine.make_caches()), full_prompt, SamplingParams(max_tokens=8))
    assert second["text"].startswith(engine.decode([cold.token_ids[0]]))
