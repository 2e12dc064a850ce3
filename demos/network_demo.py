"""The multi-node network demo, runnable from a checkout: same as `python -m node --demo`.

python demos/network_demo.py [--cache-dir DIR]
"""

from __future__ import annotations

import sys

from node.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["--demo", *sys.argv[1:]]))
