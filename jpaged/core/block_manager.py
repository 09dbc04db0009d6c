"""KV page bookkeeping on the host: a free list, a refcount per page, forks with copy-on-write,
the prefix cache, and a host pool for swapped-out pages.

NOTE: page 0 is the null page. It is never handed out: padding entries in block tables and the
slots of padding tokens point at it, so it absorbs garbage writes and is never read for a valid
position. Usable pages are 1..num_pages-1.
NOTE: refcounts. A page's refcount is the number of block tables that hold it; it is free exactly
when that is 0 and it sits in `free_pages`. `allocate` takes pages from the front of the free list
at refcount 1; `fork` gives a child its parent's table and adds 1 to each page; `free` walks a
table, decrements, and returns a page to the back of the free list when it reaches 0.
NOTE: copy-on-write. A page held by more than one table is read-only. Before a step writes into
one, `make_writable` gives the writer a fresh page and reports (shared, fresh) so the runner copies
the contents first; the other holders keep the original.
NOTE: prefix cache. A full page is immutable; `commit` names it by a chained SHA-256 key over its
tokens and its parent's key, and keeps its tokens: `match_prefix` reuses a page only when the key
and the stored tokens both match, so a hash collision can never serve another prompt's KV (vLLM's
CVE-2025-25183 was this). A freed page keeps its name until `allocate` hands it out again: the free
list is the eviction order, least recently freed first, and `free` returns a table's last pages
first.
NOTE: swap. `swap_out` moves a table's pages to host pages (refcounts on the device drop as in
`free`); `swap_in` moves them back to fresh device pages. Each returns the (from, to) pairs the
runner copies in one gather or scatter.
NOTE: pages behind a sliding window. When every layer of the model attends within the same
window W (Mistral-style), `release_before` gives back the pages a sequence can never read again:
their table entries become the null page (the table keeps its length, so the slot formula is
unchanged). Every walk over a table skips those entries; a swapped table marks them RELEASED.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from jpaged.core.sequence import Sequence
from jpaged.core.stats import Stats

NULL_PAGE = 0
RELEASED = -1      # a host table's entry for a released (null) device page: nothing to move


def page_key(parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """The prefix-cache key of a full page: SHA-256 over the parent page's key and this page's
    token ids (as little-endian int32)."""
    digest = hashlib.sha256(parent or b"")
    digest.update(np.asarray(tokens, "<i4").tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 num_host_pages: int = 0, stats: Stats | None = None):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refcounts = [0] * num_pages
        self.free_pages: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_pages))
        self.cached_pages: dict[bytes, int] = {}                  # key -> page
        self.page_keys: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # page -> (key, its tokens)
        self.num_host_pages = num_host_pages
        self.free_host_pages: list[int] = list(range(num_host_pages))
        self.stats = stats or Stats()

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_cached_free_pages(self) -> int:
        """Free pages that still hold a named prefix (reusable until handed out again)."""
        return sum(1 for page in self.page_keys if self.refcounts[page] == 0)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Pages `seq` must still get so its table covers `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq.block_table` to cover `num_tokens` tokens; all or nothing."""
        needed = self.pages_needed(seq, num_tokens)
        if needed > len(self.free_pages):
            return False
        seq.block_table.extend(self._take() for _ in range(needed))
        return True

    def _take(self) -> int:
        page, _ = self.free_pages.popitem(last=False)
        if page in self.page_keys:                         # evict its old contents from the cache
            del self.cached_pages[self.page_keys.pop(page)[0]]
        self.refcounts[page] = 1
        return page

    def _release(self, page: int) -> None:
        self.refcounts[page] -= 1
        if self.refcounts[page] == 0:
            self.free_pages[page] = None

    def free(self, seq: Sequence) -> None:
        for page in reversed(seq.block_table):
            if page != NULL_PAGE:
                self._release(page)
        seq.block_table = []
        seq.num_committed_pages = 0

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release the pages of `seq` past those covering its first `num_tokens` tokens (the
        slots of rejected speculative tokens). They were made private before the step wrote
        them (make_writable) and hold no committed prefix, so each goes back to the free list."""
        keep = -(-num_tokens // self.page_size)
        for page in reversed(seq.block_table[keep:]):
            if page != NULL_PAGE:
                self._release(page)
        del seq.block_table[keep:]

    def release_before(self, seq: Sequence, position: int) -> None:
        """Release the pages of `seq` that hold only positions < `position` (see the NOTE on
        sliding windows): walking back from the last of them to one released already."""
        i = min(position // self.page_size, len(seq.block_table)) - 1
        while i >= 0 and seq.block_table[i] != NULL_PAGE:
            self._release(seq.block_table[i])
            seq.block_table[i] = NULL_PAGE
            i -= 1

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every page of the parent (refcount + 1 each), no copy."""
        for page in parent.block_table:
            if page != NULL_PAGE:
                self.refcounts[page] += 1
        child.block_table = list(parent.block_table)
        child.num_committed_pages = parent.num_committed_pages

    def make_writable(self, seq: Sequence, first: int, end: int) -> list[tuple[int, int]] | None:
        """Give `seq` private copies of the shared pages that positions [first, end) write into.
        Returns the (shared, fresh) pages to copy, or None (nothing changed) when the free list
        is too short."""
        shared = [i for i in range(first // self.page_size, -(-end // self.page_size))
                  if i < len(seq.block_table) and self.refcounts[seq.block_table[i]] > 1]
        if len(shared) > len(self.free_pages):
            return None
        copies = []
        for i in shared:
            old, new = seq.block_table[i], self._take()
            self._release(old)
            seq.block_table[i] = new
            copies.append((old, new))
        return copies

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no pages yet the cached pages of its longest cached prefix.
        Returns the number of tokens they hold. The last token is never served from the cache:
        it must be computed to produce the logits of the next one. A sequence that wants prompt
        log-probabilities computes its whole prompt (vLLM's rule)."""
        if not self.enable_prefix_caching or seq.block_table or \
                seq.params.prompt_logprobs is not None:
            return 0
        for key, tokens in seq.full_pages(self.page_size, (seq.num_tokens - 1) // self.page_size):
            self.stats.prefix_cache_queries += 1
            page = self.cached_pages.get(key)
            if page is None or self.page_keys[page][1] != tokens:
                break
            self.stats.prefix_cache_hits += 1
            if self.refcounts[page] == 0:
                del self.free_pages[page]
            self.refcounts[page] += 1
            seq.block_table.append(page)
        seq.num_committed_pages = len(seq.block_table)
        return len(seq.block_table) * self.page_size

    def commit(self, seq: Sequence) -> None:
        """Name the pages that `seq.num_computed_tokens` has just filled, so others can share them.
        A page whose prefix is already cached under another page stays private."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.page_size
        pages = seq.full_pages(self.page_size, full)
        for i in range(seq.num_committed_pages, full):
            page, (key, tokens) = seq.block_table[i], pages[i]
            if page != NULL_PAGE and key not in self.cached_pages and page not in self.page_keys:
                self.cached_pages[key] = page
                self.page_keys[page] = (key, tokens)
        seq.num_committed_pages = max(seq.num_committed_pages, full)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's `reset_prefix_cache`); pages in use are untouched."""
        self.cached_pages.clear()
        self.page_keys.clear()

    # ---- swap ----------------------------------------------------------------------------------
    def can_swap_out(self, seq: Sequence) -> bool:
        return sum(p != NULL_PAGE for p in seq.block_table) <= len(self.free_host_pages)

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move the table to host pages: returns (device page, host page) pairs to copy; the device
        pages are released as in `free`."""
        host = [RELEASED if p == NULL_PAGE else self.free_host_pages.pop()
                for p in seq.block_table]
        moves = [(p, h) for p, h in zip(seq.block_table, host) if h != RELEASED]
        self.free(seq)
        seq.host_block_table = host
        return moves

    def can_swap_in(self, seq: Sequence) -> bool:
        return sum(h != RELEASED for h in seq.host_block_table) <= len(self.free_pages)

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Bring a swapped table back to fresh device pages: (host page, device page) pairs."""
        seq.block_table = [NULL_PAGE if h == RELEASED else self._take()
                           for h in seq.host_block_table]
        moves = [(h, p) for h, p in zip(seq.host_block_table, seq.block_table) if h != RELEASED]
        self.drop_host_pages(seq)
        return moves

    def drop_host_pages(self, seq: Sequence) -> None:
        self.free_host_pages.extend(h for h in reversed(seq.host_block_table) if h != RELEASED)
        seq.host_block_table = []

    def all_free(self) -> bool:
        return (self.num_free_pages == self.num_usable_pages and not any(self.refcounts)
                and len(self.free_host_pages) == self.num_host_pages)
