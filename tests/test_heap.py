import gc

from node.heap import freeze_long_lived


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_objects_alive_at_the_freeze_are_left_out_of_later_collections():
    long_lived = {"state": [Node() for _ in range(3)]}
    freeze_long_lived()
    try:
        newer = Node()
        tracked = {id(o) for o in gc.get_objects()}
        assert id(long_lived) not in tracked
        assert id(long_lived["state"][0]) not in tracked
        assert id(newer) in tracked
    finally:
        gc.unfreeze()


def test_garbage_made_before_the_freeze_is_collected_not_kept():
    Node()  # unreachable at once, a cycle
    freeze_long_lived()
    gc.unfreeze()  # what was frozen is tracked again: the cycle must not be among it
    assert not any(type(o) is Node for o in gc.get_objects())
