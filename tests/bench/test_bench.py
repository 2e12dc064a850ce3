"""The bench harness end to end on the tiny random-weight model: JSON schema, not figures."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from node.bench import peer
from node.bench.profile import BenchOptions, Profile
from node.bench.results import SCHEMA

TINY = Profile(
    name="tiny",
    context_sizes=(12, 40, 96),
    prefill_sizes=(40,),
    decode_tokens=6,
    restored_decode_tokens=3,
    peer_rounds=2,
    task_tokens=4,
    batched_tokens=4,
    batched_rounds=2,
    append_tokens=10,
    resume_context=30,
    resume_sessions=3,  # the default profiles run 5; 3 keep this test short
    system_tokens=16,
    cold_conversion=True,
)
# llama.cpp runs on the tiny GGUF too, where llama-cpp-python is installed (extra `peer`)
SCENARIOS = (
    ("runtime", "single", "resume", "context", "multi_agent")
    + (("peer",) if peer.llama_cpp_installed() else ())
    + ("batched", "weights", "sampling")
)
COMMON = {
    "id",
    "name",
    "title",
    "status",
    "timestamp",
    "duration_s",
    "machine",
    "model",
    "versions",
    "results",
    "notes",
}


@pytest.fixture(scope="module")
def document(tiny_gguf, model_cache, tmp_path_factory):
    from node.bench.runner import run_bench

    out = tmp_path_factory.mktemp("bench")
    options = BenchOptions(
        profile=TINY,
        model=str(tiny_gguf),
        scenarios=SCENARIOS,
        json_path=out / "bench.json",
        plot_path=out / "scaling.png",
        work_dir=out / "work",
        model_cache=model_cache,
    )
    returned = run_bench(options)
    written = json.loads((out / "bench.json").read_text())
    return {"returned": returned, "written": written, "out": out}


def scenario(document: dict, name: str) -> dict:
    return next(s for s in document["written"]["scenarios"] if s["name"] == name)


def test_document_and_common_scenario_fields(document):
    written = document["written"]
    assert written["schema"] == SCHEMA and written["profile"] == "tiny"
    assert {"cpu", "cores", "platform"} <= set(written["machine"])
    assert [s["name"] for s in written["scenarios"]] == list(SCENARIOS)
    for record in written["scenarios"]:
        assert COMMON <= set(record), record["name"]
        assert record["status"] == "ok", (record["name"], record["results"].get("error"))
        assert {"cpu", "cores", "platform"} <= set(record["machine"])
        assert {"name", "fingerprint", "backend", "dtype", "load_s"} <= set(record["model"])
        assert {"mlx", "mlx-lm", "node"} <= set(record["versions"])
    assert document["returned"]["scenarios"] == written["scenarios"]


def test_runtime_fields(document):
    results = scenario(document, "runtime")["results"]
    assert {"cold_load_s", "warm_load_s", "prefill_tok_s_40", "decode_tok_s", "targets"} <= set(results)
    assert results["cold_load_s"] is not None  # the tiny profile converts from scratch


def test_sessions_fields(document):
    single = scenario(document, "single")["results"]
    assert {"cold_s", "node_s", "node_over_cold", "same_text"} <= set(single) and single["same_text"]
    resume = scenario(document, "resume")["results"]
    assert len(resume["sessions"]) == TINY.resume_sessions
    first, *later = resume["sessions"]
    assert first["cached_tokens"] == 0 and all(s["cached_tokens"] > 0 for s in later)
    assert resume["all_same_text"]  # each fresh process continues exactly like a cold prefill
    assert {"node_total_s", "cold_total_s", "percent_faster"} <= set(resume)


def test_context_fields(document):
    results = scenario(document, "context")["results"]
    assert [r["tokens"] for r in results["contexts"]] == list(TINY.context_sizes)
    for row in results["contexts"]:
        assert {"cold_prefill_s", "restore_s", "saved_s", "ratio", "bytes_per_token"} <= set(row)
        assert row["restored_cached_tokens"] == row["tokens"]  # the fresh process restored all of it
    assert results["append"]["new_tokens"] == TINY.append_tokens
    assert results["bytes_per_token"] > 0


def test_multi_agent_fields(document):
    results = scenario(document, "multi_agent")["results"]
    assert set(results["agents"]) == {"technical", "business", "coordinator"}
    assert results["isolated"]
    assert {"creation_s", "generation_s", "total_s", "model_bytes", "memory_bytes", "disk_bytes"} <= set(
        results
    )


def test_batched_fields(document):
    results = scenario(document, "batched")["results"]
    assert [r["agents"] for r in results["rows"]] == [1, 3, 8]
    for row in results["rows"]:
        assert len(row["rounds"]["batched"]) == len(row["rounds"]["sequential"]) == TINY.batched_rounds
        for measure in row["rounds"]["batched"]:
            assert measure["largest_batch"] == row["agents"]
            assert {"aggregate_tok_s", "wall_s", "generated_tokens", "decode_tok_s"} <= set(measure)
            # a decode step runs every agent still generating at once; the steps are part of the wall time
            generated = measure["generated_tokens"]
            assert -(-generated // row["agents"]) <= measure["decode_steps"] <= generated
            assert 0 < measure["decode_steps_s"] <= measure["wall_s"]
        assert all(measure["batched"] is False for measure in row["rounds"]["sequential"])
        for field, median in (("aggregate_tok_s", "batched_tok_s"), ("decode_tok_s", "batched_decode_tok_s")):
            tok_s = sorted(m[field] for m in row["rounds"]["batched"])
            assert tok_s[0] <= row[median] <= tok_s[-1]  # the median of the rounds
    assert {"three_agents_vs_one", "three_agents_vs_one_decode_steps", "target_three_agents_vs_one"} <= set(
        results
    )
    assert len(results["three_agents_vs_one_per_round"]) == TINY.batched_rounds
    assert len(results["three_agents_vs_one_decode_steps_per_round"]) == TINY.batched_rounds
    for paired, per_round in (
        ("three_agents_vs_one_paired", "three_agents_vs_one_per_round"),
        ("three_agents_vs_one_decode_steps_paired", "three_agents_vs_one_decode_steps_per_round"),
    ):
        assert min(results[per_round]) <= results[paired] <= max(results[per_round])


def test_sampling_fields(document):
    results = scenario(document, "sampling")["results"]
    assert [(r["temperature"], r["top_p"]) for r in results["rows"]] == [(0.8, 1.0), (0.8, 0.9)]
    for row in results["rows"]:
        assert row["ours_ms"] > 0 and row["mlx_lm_ms"] > 0
        assert row["speedup"] == round(row["mlx_lm_ms"] / row["ours_ms"], 1)


@pytest.mark.skipif(not peer.llama_cpp_installed(), reason="llama-cpp-python not installed")
def test_peer_fields(document):
    results = scenario(document, "peer")["results"]
    assert [r["tokens"] for r in results["contexts"]] == list(TINY.context_sizes)
    for row in results["contexts"]:
        assert {
            "ours_prefill_s",
            "llama_prefill_s",
            "ours_restore_s",
            "llama_restore_s",
            "llama_decode_tok_s",
        } <= set(row)
        assert len(row["ours_decode_tok_s_rounds"]) == len(row["llama_decode_tok_s_rounds"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plot_written(document):
    assert (document["out"] / "scaling.png").read_bytes()[:4] == b"\x89PNG"


async def test_peer_skipped_without_llama_cpp(monkeypatch, tmp_path):
    from node.bench.workbench import Bench

    monkeypatch.setattr(peer, "llama_cpp_installed", lambda: False)
    outcome = await peer.run(Bench(None, BenchOptions(profile=TINY), tmp_path, lambda message: None))
    assert outcome.status == "skipped" and "pip install" in outcome.results["skipped_reason"]


def test_cli_lists_scenarios_and_refuses_unknown_ones():
    listed = subprocess.run(
        [sys.executable, "-m", "node", "bench", "--list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listed.returncode == 0 and "context" in listed.stdout and "peer" in listed.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "node", "bench", "--scenarios", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "unknown scenario" in bad.stderr


def test_weights_scenario_compares_int8_with_fp32(document):
    """Scenario 8: both sides decoded in fresh processes; agreement counted over their tokens."""
    results = scenario(document, "weights")["results"]
    assert results["fp32"]["decode_tok_s"] and results["int8"]["decode_tok_s"]
    assert any(k.startswith("int8 weights") for k in results["int8"]["kernels"])
    assert not any(k.startswith("int8 weights") for k in results["fp32"]["kernels"])
    agreement = results["agreement"]
    assert agreement["compared_tokens"] == min(
        len(results["fp32"]["token_ids"]), len(results["int8"]["token_ids"])
    )
    assert 0 < agreement["compared_tokens"] and 0.0 <= agreement["same_positions"] <= 1.0


def test_agreement_counts_the_first_difference():
    from node.bench.weights import agreement

    assert agreement([1, 2, 3, 4], [1, 2, 9, 4, 5]) == {
        "compared_tokens": 4,
        "first_difference": 2,
        "same_positions": 0.75,
    }
    assert agreement([1, 2], [1, 2])["first_difference"] is None
