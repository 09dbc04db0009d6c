"""KV page bookkeeping on the host: a free list, a refcount per page, and the prefix cache.

NOTE: page 0 is the null page. It is never handed out: padding entries in block tables and the
slots of padding tokens point at it, so it absorbs garbage writes and is never read for a valid
position. Usable pages are 1..num_pages-1.
NOTE: refcounts. A page is free exactly when its refcount is 0 and it sits in `free_pages`.
`allocate` takes pages from the front of the free list at refcount 1; `free` walks a table,
decrements, and returns a page to the back of the free list when it reaches 0.
NOTE: prefix cache. A page whose S tokens are all computed is immutable; `commit` names it by the
hash of its tokens and of every token before it, so equal prompt prefixes map to the same pages.
`match_prefix` gives a new sequence those pages (refcount + 1, taken out of the free list if they
were free). A freed page keeps its name until `allocate` hands it out again: the free list is the
eviction order, least recently freed first, and `free` returns a table's last pages first.
"""

from __future__ import annotations

from collections import OrderedDict

from jpaged.core.sequence import Sequence

NULL_PAGE = 0


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refcounts = [0] * num_pages
        self.free_pages: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_pages))
        self.cached_pages: dict[int, int] = {}     # prefix hash -> page
        self.page_hashes: dict[int, int] = {}      # page -> prefix hash

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Pages `seq` must still get so its table covers `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq.block_table` to cover `num_tokens` tokens; all or nothing."""
        needed = self.pages_needed(seq, num_tokens)
        if needed > len(self.free_pages):
            return False
        for _ in range(needed):
            page, _ = self.free_pages.popitem(last=False)
            if page in self.page_hashes:                  # evict its old contents from the cache
                del self.cached_pages[self.page_hashes.pop(page)]
            self.refcounts[page] = 1
            seq.block_table.append(page)
        return True

    def free(self, seq: Sequence) -> None:
        for page in reversed(seq.block_table):
            self.refcounts[page] -= 1
            if self.refcounts[page] == 0:
                self.free_pages[page] = None
        seq.block_table = []
        seq.num_committed_pages = 0

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no pages yet the cached pages of its longest cached prefix.
        Returns the number of tokens they hold. The last token is never served from the cache:
        it must be computed to produce the logits of the next one."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        hashes = seq.prefix_hashes(self.page_size, (seq.num_tokens - 1) // self.page_size)
        for prefix_hash in hashes:
            page = self.cached_pages.get(prefix_hash)
            if page is None:
                break
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
        hashes = seq.prefix_hashes(self.page_size, full)
        for i in range(seq.num_committed_pages, full):
            page = seq.block_table[i]
            if hashes[i] not in self.cached_pages and page not in self.page_hashes:
                self.cached_pages[hashes[i]] = page
                self.page_hashes[page] = hashes[i]
        seq.num_committed_pages = max(seq.num_committed_pages, full)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's `reset_prefix_cache`); pages in use are untouched."""
        self.cached_pages.clear()
        self.page_hashes.clear()

    def all_free(self) -> bool:
        return self.num_free_pages == self.num_usable_pages and not any(self.refcounts)
