"""The in-memory tree of stored KV blocks: longest prefixes anywhere, holders and orphans."""

from __future__ import annotations

from node.memory.prefix_index import BlockRef, PrefixIndex


def _path(blocks: list[list[int]]) -> tuple[list[BlockRef], dict[str, list[int]]]:
    refs, tokens, start = [], {}, 0
    for i, ids in enumerate(blocks):
        key = "-".join(map(str, ids)) + f"@{start}"
        refs.append(BlockRef(key, start, len(ids)))
        tokens[key] = ids
        start += len(ids)
    return refs, tokens


def _index(**contexts: list[list[int]]) -> PrefixIndex:
    index = PrefixIndex()
    for name, blocks in contexts.items():
        refs, tokens = _path(blocks)
        index.set_path(name, refs, lambda ref, tokens=tokens: tokens[ref.key])
    return index


def test_the_longest_prefix_is_found_in_whichever_context_holds_it():
    index = _index(a=[[1, 2, 3], [4, 5, 6]], b=[[1, 2, 3], [4, 5, 9], [7, 7]])
    match = index.longest([1, 2, 3, 4, 5, 9, 7, 8])
    assert match.length == 7 and match.holder == "b" and [r.start for r in match.path] == [0, 3, 6]
    partial = index.longest([1, 2, 3, 4, 0])
    assert partial.length == 4 and len(partial.path) == 2  # its last block in part
    assert index.longest([9, 9]).length == 0 and index.longest([]).path == ()


def test_shared_blocks_have_every_holder_and_orphans_are_reported_once():
    index = _index(a=[[1, 2], [3, 4]], b=[[1, 2], [3, 5]])
    shared = index.path("a")[0].key
    assert index.holders(shared) == {"a", "b"}
    assert index.remove("a") == ["3-4@2"]
    assert index.holders(shared) == {"b"} and index.longest([1, 2, 3, 4]).length == 3
    assert sorted(index.remove("b")) == sorted([shared, "3-5@2"])
    assert index.contexts() == [] and index.longest([1, 2]).length == 0


def test_replacing_a_path_keeps_blocks_it_still_uses():
    index = _index(a=[[1, 2], [3]])
    refs, tokens = _path([[1, 2], [3, 4]])
    orphans = index.set_path("a", refs, lambda ref: tokens[ref.key])
    assert orphans == ["3@2"] and index.holders(refs[0].key) == {"a"}
