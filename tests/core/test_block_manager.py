"""Exact page ids and refcounts through the block manager's life cycle."""

import pytest

from jpaged.core.block_manager import NULL_PAGE, BlockManager
from jpaged.sampling_params import SamplingParams
from jpaged.core.sequence import Sequence


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


def computed_seq(tokens, bm):
    """A sequence whose tokens are all computed in freshly allocated pages, committed."""
    seq = Sequence("r", 0, tokens, SamplingParams(), seed=0, max_tokens=8)
    assert bm.allocate(seq, len(tokens))
    seq.num_computed_tokens = len(tokens)
    bm.commit(seq)
    return seq


def test_prefix_cache_shares_full_pages_of_equal_prefixes():
    bm = BlockManager(num_pages=10, page_size=4)
    a = computed_seq(list(range(10)), bm)                 # pages 1, 2 full; page 3 partial
    assert a.block_table == [1, 2, 3]
    assert set(bm.page_hashes) == {1, 2}
    b = make_seq()
    b.token_ids = b.prompt_token_ids = list(range(8)) + [50, 51]
    assert bm.match_prefix(b) == 8
    assert b.block_table == [1, 2] and bm.refcounts[1:4] == [2, 2, 1]
    c = make_seq()
    c.token_ids = c.prompt_token_ids = list(range(4)) + [60, 61, 62, 63, 64]
    assert bm.match_prefix(c) == 4 and c.block_table == [1]   # the second page differs


def test_prefix_cache_never_serves_the_last_token():
    bm = BlockManager(num_pages=10, page_size=4)
    computed_seq(list(range(8)), bm)
    b = make_seq()
    b.token_ids = b.prompt_token_ids = list(range(8))
    assert bm.match_prefix(b) == 4                        # (8 - 1) // 4 = 1 page


def test_freed_pages_stay_cached_until_handed_out_again():
    bm = BlockManager(num_pages=6, page_size=2)
    a = computed_seq([7, 8, 9, 10, 11], bm)               # pages 1, 2 full, 3 partial
    bm.free(a)
    assert list(bm.free_pages) == [4, 5, 3, 2, 1]         # least recently freed first
    b = make_seq()
    b.token_ids = b.prompt_token_ids = [7, 8, 9, 10, 99]
    assert bm.match_prefix(b) == 4 and b.block_table == [1, 2]
    assert list(bm.free_pages) == [4, 5, 3]               # revived pages leave the free list
    bm.free(b)
    other = make_seq()
    assert bm.allocate(other, 10)                         # takes 4, 5, 3, 2, 1: evicts 2 and 1
    assert other.block_table == [4, 5, 3, 2, 1] and not bm.cached_pages
    bm.free(other)
    again = make_seq()
    again.token_ids = again.prompt_token_ids = [7, 8, 9, 10, 99]
    assert bm.match_prefix(again) == 0
    assert bm.all_free()


def test_prefix_caching_can_be_switched_off():
    bm = BlockManager(num_pages=10, page_size=4, enable_prefix_caching=False)
    computed_seq(list(range(10)), bm)
    b = make_seq()
    b.token_ids = b.prompt_token_ids = list(range(10))
    assert bm.match_prefix(b) == 0 and not bm.cached_pages
