"""`python -m node load` in small (issue 17): 6 clients for 8 s against a real tiny node that admits 2
generations at a time. Some requests complete, some are refused with the protocols' overload
errors, none is a 5xx, every A2A task ends terminal, and the node's peak RSS is reported."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.a2a_node import REPO, start_tiny_node


def test_load_small(tiny_gguf, tmp_path):
    node = start_tiny_node(
        tiny_gguf, tmp_path, "--skills", "technical_analysis,business_analysis", "--max-pending", "2"
    )
    report_path = tmp_path / "load.json"
    try:
        command = [
            sys.executable,
            "-m",
            "node",
            "load",
            "--url",
            node.url,
            "--clients",
            "6",
            "--seconds",
            "8",
        ]
        done = subprocess.run(
            [*command, "--max-tokens", "4", "--json", str(report_path)],
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        node.stop()
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["completed"] > 0 and report["rejected"] > 0, report
    assert report["server_errors"] == 0 and report["not_terminal"] == 0 and report["errors"] == 0, report
    assert report["peak_rss_bytes"] and report["p50_s"] is not None
    assert "completed" in done.stdout and "peak RSS" in done.stdout
