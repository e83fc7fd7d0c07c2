"""snapfs.lru: the bounded bookkeeping map."""

from __future__ import annotations

import pytest

from snapfs.lru import LRUDict


def test_lru_dict() -> None:
    d: LRUDict[str, int] = LRUDict(2)
    d["a"], d["b"] = 1, 2
    assert d.get("a") == 1  # a use: "b" is now the least recent
    d["c"] = 3
    assert dict(d) == {"a": 1, "c": 3}
    assert "a" in d and "b" not in d
    d.setdefault("d", 4)
    assert list(d) == ["c", "d"]  # "a" was the least recent (a membership test is not a use)
    assert d.pop("c") == 3 and len(d) == 1
    with pytest.raises(ValueError):
        LRUDict(0)


def test_walking_is_not_a_use() -> None:
    d: LRUDict[int, int] = LRUDict(3)
    for i in range(3):
        d[i] = i
    assert dict(d) == {0: 0, 1: 1, 2: 2} and list(d.items()) == [(0, 0), (1, 1), (2, 2)]
    assert list(d.values()) == [0, 1, 2]
    assert next(iter(d.items())) == (0, 0)  # a partial walk leaves the order alone
    d[3] = 3
    assert list(d) == [1, 2, 3]
