"""Node processes for the demo: `python -m node serve` children in their own process groups.

Each child gets its own session, so stopping it (SIGINT, then SIGKILL after a grace period) reaches
everything it started, and `stop_all` in a `finally` leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 600
STOP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoNode:
    def __init__(self, name: str, port: int, cache_dir: Path, log_dir: Path, *flags: str) -> None:
        self.name, self.port, self.cache_dir, self.flags = name, port, cache_dir, flags
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"node-{name.lower()}.log"
        self.proc: subprocess.Popen | None = None
        self.started_s = 0.0

    def launch(self) -> None:
        command = [sys.executable, "-m", "node", "serve", "--port", str(self.port)]
        command += ["--cache-dir", str(self.cache_dir), *self.flags]
        self.started_s = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy()
            )

    def wait_healthy(self) -> float:
        """Block until /health answers 200 -> seconds since launch."""
        deadline = self.started_s + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"node {self.name} exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.started_s
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"node {self.name} did not start in {START_TIMEOUT_S} s; see {self.log_path}")

    def stop(self) -> int | None:
        """SIGINT to the node's process group (graceful: agents are checkpointed), SIGKILL if stuck."""
        if self.proc is None:
            return None
        code = None
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except ProcessLookupError:
            code = self.proc.wait()
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        finally:
            _kill_group(self.proc.pid)
            self.proc = None
        return code


def start_all(nodes: list[DemoNode]) -> dict[str, float]:
    """Launch the nodes together (their model loads overlap) -> start-up seconds by name."""
    for node in nodes:
        node.launch()
    return {node.name: node.wait_healthy() for node in nodes}


def stop_all(nodes: list[DemoNode]) -> None:
    for node in nodes:
        node.stop()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
