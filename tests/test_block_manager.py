"""Exact page ids and refcounts through the block manager's life cycle."""

import pytest

from jpaged.block_manager import NULL_PAGE, BlockManager
from jpaged.sampling_params import SamplingParams
from jpaged.sequence import Sequence


def make_seq(num_tokens=5):
    return Sequence("r", 0, list(range(num_tokens)), SamplingParams(), seed=0, max_tokens=8)


def test_null_page_is_never_handed_out():
    bm = BlockManager(num_pages=4, page_size=4)
    assert list(bm.free_pages) == [1, 2, 3]
    assert bm.num_usable_pages == 3
    assert NULL_PAGE not in bm.free_pages


def test_allocate_grows_table_page_by_page():
    bm = BlockManager(num_pages=6, page_size=4)
    seq = make_seq()
    assert bm.allocate(seq, 5)
    assert seq.block_table == [1, 2]
    assert bm.allocate(seq, 8)              # still fits in 2 pages
    assert seq.block_table == [1, 2]
    assert bm.allocate(seq, 9)
    assert seq.block_table == [1, 2, 3]
    assert bm.refcounts == [0, 1, 1, 1, 0, 0]
    assert list(bm.free_pages) == [4, 5]


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_pages=3, page_size=4)
    seq = make_seq()
    assert not bm.allocate(seq, 12)         # needs 3 pages, only 2 usable
    assert seq.block_table == []
    assert bm.num_free_pages == 2


def test_free_returns_pages_in_reverse_order_and_reuses_them():
    bm = BlockManager(num_pages=5, page_size=2)
    a, b = make_seq(), make_seq()
    bm.allocate(a, 4)
    bm.allocate(b, 2)
    assert (a.block_table, b.block_table) == ([1, 2], [3])
    bm.free(a)
    assert a.block_table == []
    assert list(bm.free_pages) == [4, 2, 1]
    assert bm.refcounts == [0, 0, 0, 1, 0]
    c = make_seq()
    bm.allocate(c, 3)
    assert c.block_table == [4, 2]
    bm.free(b)
    bm.free(c)
    assert bm.all_free()


def test_needs_two_pages():
    with pytest.raises(ValueError, match="num_pages must be >= 2"):
        BlockManager(num_pages=1, page_size=16)
