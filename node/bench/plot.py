"""The context-scaling plot: context size vs seconds, cold prefill vs restore, log scales."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def series_from(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Lines to draw, from the scenario records of one run (context scaling and the peer)."""
    by_name = {r["name"]: r for r in records if r.get("status") == "ok"}
    series: dict[str, list[tuple[int, float]]] = {}
    contexts = by_name.get("context", {}).get("results", {}).get("contexts", [])
    if contexts:
        series["this node: cold prefill"] = [(r["tokens"], r["cold_prefill_s"]) for r in contexts]
        series["this node: restore from disk (fresh process)"] = [
            (r["tokens"], r["restore_s"]) for r in contexts
        ]
    peer = by_name.get("peer", {}).get("results", {}).get("contexts", [])
    if peer:
        series["llama.cpp: cold prefill"] = [
            (r["tokens"], r["llama_prefill_s"]) for r in peer if r.get("llama_prefill_s")
        ]
        series["llama.cpp: state restore (fresh process)"] = [
            (r["tokens"], r["llama_restore_s"]) for r in peer if r.get("llama_restore_s")
        ]
    return {name: points for name, points in series.items() if points}


def plot_context_scaling(records: list[dict], path: Path, title: str) -> Path | None:
    """Write the PNG; None (with the reason logged) when matplotlib or the data is missing."""
    series = series_from(records)
    if not series:
        logger.info("no context-scaling figures in this run: no plot")
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'persistent-agent-node[bench]'): no plot")
        return None
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"cold": "-", "restore": "--"}
    for name, points in series.items():
        xs, ys = zip(*sorted(points))
        style = styles["cold"] if "cold" in name else styles["restore"]
        axes.plot(xs, ys, style, marker="o", label=name)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("context size (tokens)")
    axes.set_ylabel("seconds (log scale)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
