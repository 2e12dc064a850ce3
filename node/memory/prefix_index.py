"""Which stored contexts share the longest prefix with a prompt: a tree of KV blocks in memory.

Every context is a path of blocks from position 0. The index holds each block once (its key, its
parent's key, its token ids) and which contexts reference it, so a lookup walks the prompt down the
tree block by block and ends in the block that shares the most tokens, wherever that block is and
whoever wrote it. Reference counts (the holders of a block) say when a block can be deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.runtime.prefix import common_prefix_length


@dataclass(frozen=True)
class BlockRef:
    """Positions [start, start + length) of a context, stored in block `key`."""

    key: str
    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length

    def as_dict(self) -> dict:
        return {"key": self.key, "start": self.start, "length": self.length}

    @classmethod
    def from_dict(cls, data: dict) -> BlockRef:
        return cls(str(data["key"]), int(data["start"]), int(data["length"]))


@dataclass(frozen=True)
class PrefixMatch:
    """`length` prompt tokens are stored along `path` (its last block possibly in part)."""

    length: int
    path: tuple[BlockRef, ...]
    holder: str | None  # a context whose path holds the match's last block


@dataclass
class _Node:
    key: str
    parent: str | None
    tokens: tuple[int, ...]
    holders: set[str]


class PrefixIndex:
    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}
        self._children: dict[str | None, dict[int, list[str]]] = {}
        self._paths: dict[str, tuple[BlockRef, ...]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._nodes

    def path(self, context: str) -> tuple[BlockRef, ...]:
        return self._paths.get(context, ())

    def contexts(self) -> list[str]:
        return list(self._paths)

    def holders(self, key: str) -> set[str]:
        node = self._nodes.get(key)
        return set(node.holders) if node else set()

    def set_path(self, context: str, path: list[BlockRef], tokens_of) -> list[str]:
        """Make `context` reference `path`; returns the keys no context references any more.

        `tokens_of(ref)` gives a block's token ids (called only for blocks the index lacks).
        """
        previous = self._paths.pop(context, ())
        parent = None
        for ref in path:
            node = self._nodes.get(ref.key)
            if node is None:
                node = self._nodes[ref.key] = _Node(ref.key, parent, tuple(tokens_of(ref)), set())
                if node.tokens:
                    self._children.setdefault(parent, {}).setdefault(node.tokens[0], []).append(ref.key)
            node.holders.add(context)
            parent = ref.key
        if path:
            self._paths[context] = tuple(path)
        return self._release(context, previous, {ref.key for ref in path})

    def remove(self, context: str) -> list[str]:
        """Forget `context`; returns the keys no context references any more."""
        return self._release(context, self._paths.pop(context, ()), set())

    def _release(self, context: str, previous, kept: set[str]) -> list[str]:
        orphans = []
        for ref in previous:
            node = self._nodes.get(ref.key)
            if node is None or ref.key in kept:
                continue
            node.holders.discard(context)
            if not node.holders:
                orphans.append(ref.key)
                self._drop(node)
        return orphans

    def _drop(self, node: _Node) -> None:
        del self._nodes[node.key]
        siblings = self._children.get(node.parent, {}).get(node.tokens[0] if node.tokens else -1, [])
        if node.key in siblings:
            siblings.remove(node.key)

    def longest(self, prompt: list[int], readable=lambda context: True) -> PrefixMatch:
        """The stored prefix sharing the most leading tokens with `prompt`, among the blocks some
        `readable(context)` holds."""
        path: list[BlockRef] = []
        position, parent = 0, None
        while position < len(prompt):
            best_key, best_shared = None, 0
            for key in self._children.get(parent, {}).get(prompt[position], ()):
                node = self._nodes[key]
                if not any(readable(holder) for holder in node.holders):
                    continue
                shared = common_prefix_length(node.tokens, prompt[position : position + len(node.tokens)])
                if shared > best_shared:
                    best_key, best_shared = key, shared
            if best_key is None:
                break
            node = self._nodes[best_key]
            path.append(BlockRef(best_key, position, len(node.tokens)))
            position += best_shared
            if best_shared < len(node.tokens):
                break
            parent = best_key
        holders = self._nodes[path[-1].key].holders if path else ()
        holder = next((h for h in holders if readable(h)), None)
        return PrefixMatch(position, tuple(path), holder)
