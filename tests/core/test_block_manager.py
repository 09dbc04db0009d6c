"""Exact page ids and refcounts through the block manager's life cycle."""

import hashlib

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jpaged.core.block_manager import NULL_PAGE, RELEASED, BlockManager, page_key
from jpaged.core.sequence import Sequence
from jpaged.sampling_params import SamplingParams


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
    assert set(bm.page_keys) == {1, 2}
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


def test_page_keys_chain_sha256_over_parent_and_tokens():
    a = page_key(None, (1, 2, 3, 4))
    assert a == hashlib.sha256(np.asarray([1, 2, 3, 4], "<i4").tobytes()).digest()
    assert page_key(a, (5, 6, 7, 8)) != page_key(page_key(None, (9, 9, 9, 9)), (5, 6, 7, 8))


def test_a_key_collision_never_serves_another_prompts_page():
    """Even if two different pages had the same key, the stored tokens are compared first."""
    bm = BlockManager(num_pages=10, page_size=4)
    a = computed_seq([1, 2, 3, 4, 5], bm)                 # page 1 named by a's first 4 tokens
    b = make_seq()
    b.token_ids = b.prompt_token_ids = [9, 9, 9, 9, 5]
    forged = b.full_pages(4, 1)[0][0]
    bm.cached_pages[forged] = a.block_table[0]           # plant a's page under b's key
    assert bm.match_prefix(b) == 0 and b.block_table == []
    assert (bm.stats.prefix_cache_queries, bm.stats.prefix_cache_hits) == (1, 0)


def test_fork_shares_every_page_and_copy_on_write_gives_the_writer_a_fresh_one():
    bm = BlockManager(num_pages=8, page_size=4, enable_prefix_caching=False)
    parent = make_seq(6)
    assert bm.allocate(parent, 6) and parent.block_table == [1, 2]
    child = make_seq(6)
    bm.fork(parent, child)
    assert child.block_table == [1, 2] and bm.refcounts[1:3] == [2, 2]
    # The child writes position 6 (page index 1, shared): it gets page 3, a copy of page 2.
    assert bm.make_writable(child, 6, 7) == [(2, 3)]
    assert child.block_table == [1, 3] and bm.refcounts[1:4] == [2, 1, 1]
    # The parent is now the only holder of page 2: it writes in place.
    assert bm.make_writable(parent, 6, 7) == []
    # Too few free pages: nothing changes.
    other = make_seq(4)
    bm.fork(parent, other)
    assert bm.allocate(make_seq(), 16)                    # takes pages 4..7
    assert bm.make_writable(other, 6, 7) is None and other.block_table == [1, 2]
    bm.free(other)
    bm.free(child)
    bm.free(parent)
    assert bm.refcounts[1:4] == [0, 0, 0]


def test_swap_out_and_in_move_exact_pages():
    bm = BlockManager(num_pages=6, page_size=2, enable_prefix_caching=False, num_host_pages=3)
    a = make_seq(5)
    assert bm.allocate(a, 5) and a.block_table == [1, 2, 3]
    assert bm.can_swap_out(a)
    assert bm.swap_out(a) == [(1, 2), (2, 1), (3, 0)]     # host pages from the back of the list
    assert a.block_table == [] and a.host_block_table == [2, 1, 0]
    assert bm.free_host_pages == [] and bm.num_free_pages == 5
    blocker = make_seq()
    assert bm.allocate(blocker, 6)                        # pages 4, 5, 3
    assert not bm.can_swap_in(a)
    bm.free(blocker)                                      # free list: 2, 1, 3, 5, 4
    assert bm.swap_in(a) == [(2, 2), (1, 1), (0, 3)]
    assert a.block_table == [2, 1, 3] and a.host_block_table == []
    bm.free(a)
    assert bm.all_free()


def test_pages_behind_a_sliding_window_are_released():
    """release_before gives back the pages holding only positions before the window: their
    entries become the null page; forks, copy-on-write, swap and free skip them."""
    bm = BlockManager(num_pages=10, page_size=4, enable_prefix_caching=False, num_host_pages=4)
    a = make_seq(14)
    assert bm.allocate(a, 14) and a.block_table == [1, 2, 3, 4]
    bm.release_before(a, 7)                    # positions 0..6 unseen: page 1 (0..3) only
    assert a.block_table == [NULL_PAGE, 2, 3, 4] and bm.refcounts[:5] == [0, 0, 1, 1, 1]
    assert list(bm.free_pages)[-1] == 1
    child = make_seq(14)
    bm.fork(a, child)
    assert child.block_table == [NULL_PAGE, 2, 3, 4] and bm.refcounts[:5] == [0, 0, 2, 2, 2]
    bm.release_before(a, 12)                   # pages 2, 3 (positions 4..11): still the child's
    assert a.block_table == [NULL_PAGE] * 3 + [4] and bm.refcounts[:5] == [0, 0, 1, 1, 2]
    assert bm.make_writable(a, 14, 15) == [(4, 5)]        # the shared last page, copied
    bm.free(child)
    assert bm.refcounts[:6] == [0, 0, 0, 0, 0, 1]
    assert bm.swap_out(a) == [(5, 3)] and a.host_block_table == [RELEASED] * 3 + [3]
    assert bm.swap_in(a) == [(3, 6)] and a.block_table == [NULL_PAGE] * 3 + [6]
    assert bm.free_host_pages == [0, 1, 2, 3]
    bm.free(a)
    assert bm.all_free()


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / copy-on-write / free / commit / match / evict / swap
    sequences keep every refcount equal to the number of tables holding the page, never a page
    both free and held, and everything free at the end."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_pages=12, page_size=2, num_host_pages=6)
        self.live: list[Sequence] = []
        self.swapped: list[Sequence] = []

    @rule(length=st.integers(1, 9), prefix=st.integers(0, 3))
    def add(self, length, prefix):
        seq = make_seq()
        seq.token_ids = seq.prompt_token_ids = [7] * prefix + list(range(length))
        seq.num_computed_tokens = self.bm.match_prefix(seq)
        if self.bm.allocate(seq, seq.num_tokens):
            self.live.append(seq)
        else:
            self.bm.free(seq)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100), grow=st.integers(1, 4))
    def append_and_write(self, index, grow):
        seq = self.live[index % len(self.live)]
        start = seq.num_computed_tokens
        seq.token_ids += [3] * grow
        if self.bm.allocate(seq, seq.num_tokens) and \
                self.bm.make_writable(seq, start, seq.num_tokens) is not None:
            seq.num_computed_tokens = seq.num_tokens
            self.bm.commit(seq)
        else:
            del seq.token_ids[-grow:]

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100))
    def fork(self, index):
        parent = self.live[index % len(self.live)]
        child = make_seq()
        child.token_ids = list(parent.token_ids)
        child.prompt_token_ids = list(parent.prompt_token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        self.bm.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100), position=st.integers(0, 12))
    def release_behind_window(self, index, position):
        seq = self.live[index % len(self.live)]
        self.bm.release_before(seq, min(position, seq.num_computed_tokens))

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100))
    def free(self, index):
        self.bm.free(self.live.pop(index % len(self.live)))

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100))
    def swap_out(self, index):
        seq = self.live[index % len(self.live)]
        if self.bm.can_swap_out(seq):
            self.bm.swap_out(seq)
            self.live.remove(seq)
            self.swapped.append(seq)

    @precondition(lambda self: self.swapped)
    @rule(index=st.integers(0, 100))
    def swap_in(self, index):
        seq = self.swapped[index % len(self.swapped)]
        if self.bm.can_swap_in(seq):
            self.bm.swap_in(seq)
            self.swapped.remove(seq)
            self.live.append(seq)

    @rule()
    def reset_prefix_cache(self):
        self.bm.reset_prefix_cache()

    @invariant()
    def refcounts_match_tables(self):
        held = [0] * self.bm.num_pages
        for seq in self.live:
            for page in seq.block_table:
                held[page] += page != NULL_PAGE           # released behind a window
        assert held == self.bm.refcounts
        assert held[NULL_PAGE] == 0
        assert not any(held[page] for page in self.bm.free_pages)
        assert len(self.bm.free_pages) == sum(1 for h in held[1:] if h == 0)
        host = [p for seq in self.swapped for p in seq.host_block_table if p != RELEASED]
        assert len(host) == len(set(host)) and not set(host) & set(self.bm.free_host_pages)
        assert len(host) + len(self.bm.free_host_pages) == self.bm.num_host_pages
        for page, (key, tokens) in self.bm.page_keys.items():
            assert self.bm.cached_pages[key] == page

    def teardown(self):
        for seq in self.live:
            self.bm.free(seq)
        for seq in self.swapped:
            self.bm.drop_host_pages(seq)
        assert self.bm.all_free()


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
