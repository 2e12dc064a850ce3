"""A throwaway PostgreSQL cluster for tests: Debian's binaries, a temp dir, a free loopback port.

initdb refuses to run as root, so as root the cluster belongs to the `postgres` user (its folder
is created for that user); as anyone else it is the current user's.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_owner(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextmanager
def postgres_cluster(port: int) -> Iterator[str]:
    """Start a cluster and yield its SQLAlchemy asyncpg URL; stop and delete it afterwards."""
    binaries = postgres_bin()
    assert binaries is not None, "PostgreSQL binaries are not installed"
    folder = Path(tempfile.mkdtemp(prefix="node-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, log = folder / "data", folder / "server.log"

    def run(program: str, *args: str) -> None:
        subprocess.run(_as_owner([str(binaries / program), *args]), check=True, capture_output=True)

    try:
        run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        run("pg_ctl", "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
        try:
            yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
        finally:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
