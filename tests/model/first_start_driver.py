"""One first-start step in a process of its own, for tests/model/test_first_start.py.

    python -m tests.model.first_start_driver assemble                  the fake default model
    python -m tests.model.first_start_driver convert GGUF CACHE_ROOT   a GGUF conversion

Progress goes to stdout, then `done PATH`. With `$FIRST_START_GATE` set, the step stops part-way
(assembly after its first chunk, conversion after the folder's files but before its marker)
until that file exists: see `tests.model.fake_gguf_package.gate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from node.model import gguf_import, spec
from tests.model import fake_gguf_package


def say(message: str) -> None:
    print(message, flush=True)


def gated_conversion(convert):
    def convert_then_gate(path: Path, folder: Path, progress) -> None:
        convert(path, folder, progress)
        fake_gguf_package.gate()

    return convert_then_gate


def main(argv: list[str]) -> int:
    if argv[0] == "assemble":
        path = spec.default_gguf(say, package=fake_gguf_package)
    else:
        gguf_import.convert_gguf = gated_conversion(gguf_import.convert_gguf)
        path = gguf_import.converted_folder(Path(argv[1]), Path(argv[2]), say)
    say(f"done {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
