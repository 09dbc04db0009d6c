"""KV page bookkeeping on the host: a free list and a refcount per page.

NOTE: page 0 is the null page. It is never handed out: padding entries in block tables and the
slots of padding tokens point at it, so it absorbs garbage writes and is never read for a valid
position. Usable pages are 1..num_pages-1.
NOTE: refcounts. A page is free exactly when its refcount is 0 and it sits in `free_pages`.
`allocate` takes pages from the front of the free list at refcount 1; `free` walks a table,
decrements, and returns a page to the back of the free list when it reaches 0.
"""

from __future__ import annotations

from collections import deque

from jpaged.sequence import Sequence

NULL_PAGE = 0


class BlockManager:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.refcounts = [0] * num_pages
        self.free_pages: deque[int] = deque(range(1, num_pages))

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
            page = self.free_pages.popleft()
            self.refcounts[page] = 1
            seq.block_table.append(page)
        return True

    def free(self, seq: Sequence) -> None:
        for page in reversed(seq.block_table):
            self.refcounts[page] -= 1
            if self.refcounts[page] == 0:
                self.free_pages.append(page)
        seq.block_table = []

    def all_free(self) -> bool:
        return self.num_free_pages == self.num_usable_pages and not any(self.refcounts)
