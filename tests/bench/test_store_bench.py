"""The store scenario (9) end to end on the tiny random-weight model and a SeaweedFS the bench
starts on loopback: its JSON fields, the resumes and the transfer floor beside them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from node.bench.profile import BenchOptions
from tests.bench.test_bench import TINY
from tests.seaweedfs import weed_unusable


@pytest.mark.skipif(weed_unusable() is not None, reason=f"no SeaweedFS: {weed_unusable()}")
def test_store_scenario_resumes_on_fresh_nodes_and_measures_the_transfer_floor(
    tiny_gguf, model_cache, tmp_path, monkeypatch
):
    from node.bench.runner import run_bench

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the bench starts its own SeaweedFS
    options = BenchOptions(
        profile=dataclasses.replace(TINY, store_sizes=(2048,)),
        model=str(tiny_gguf),
        scenarios=("store",),
        json_path=tmp_path / "bench.json",
        plot_path=tmp_path / "scaling.png",
        work_dir=tmp_path / "work",
        model_cache=model_cache,
    )
    run_bench(options)
    (record,) = json.loads((tmp_path / "bench.json").read_text())["scenarios"]
    assert record["status"] == "ok", record["results"].get("error")
    (row,) = record["results"]["sizes"]
    assert row["tokens"] == 2048 and len(row["store_resumes"]) == 5
    # each resume is compared with the local restore run just before it
    paired = sorted(r["resume_vs_local"] for r in row["store_resumes"])
    assert row["resume_vs_local"] == paired[2]
    for r in row["store_resumes"]:  # (the JSON rounds the seconds to 0.1 ms)
        assert r["resume_vs_local"] == pytest.approx(r["resume_s"] / r["local_restore_s"], rel=0.05, abs=0.1)
    assert row["best_local_restore_s"] <= row["local_restore_s"]
    for resumed in row["store_resumes"]:  # where each pull's time went
        phases = resumed["pull_phases_s"]
        assert set(phases) == {"manifest", "transfer", "adopt"}
        assert sum(phases.values()) == pytest.approx(resumed["pull_s"], abs=0.001)
    floor = row["transfer_floor"]
    assert floor["objects"] >= 1 and floor["runs"] == 7
    # the floor fetched what a pull fetches: the same bytes as the first resume's pull
    assert floor["bytes"] == row["bytes"]
    assert 0 < floor["gets_s"] and 0 < floor["gets_beside_restore_s"]
    # (the JSON rounds the seconds to 0.1 ms)
    assert row["gets_vs_local"] == pytest.approx(floor["gets_s"] / row["local_restore_s"], rel=0.05)
    assert record["results"]["shared_playbook"]["copies"] == 1.0
