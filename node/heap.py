"""Objects that live as long as the process, kept out of the cyclic garbage collector.

Importing mlx-lm and its dependencies leaves ~75k objects the collector tracks, and boto3 (the
block store's credentials) ~50k more; a full collection scanned them all for 30-70 ms on this
CPU, stalling every thread, and one came every few pulls from the block store (their JSON
headers allocate enough containers), in the middle of the pull. `freeze_long_lived` is called
once such a library is loaded and its state built: what is alive then is frozen (`gc.freeze`),
after the garbage made so far is collected, and later collections scan only newer objects.
The price: an object frozen while alive that later dies in a reference cycle is never freed (its
refcount alone cannot free it), so the freeze comes where what is alive stays: after start-up.
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    gc.collect()
    gc.freeze()
