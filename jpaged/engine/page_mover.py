"""Page moves the scheduler asks for before a step: swap out to the host pool, swap in, and
copy-on-write copies, each as one jitted gather or scatter over every page that moves.

NOTE: order matters and is fixed: swap-out reads pages the scheduler has already freed (and may
have handed to another sequence that writes them in this very step), so it runs first; then
swap-in fills freshly allocated pages; then the copies; then the step. Page counts are padded to
powers of two (the padding moves the null page 0 onto itself) so few shapes ever compile.
"""

from __future__ import annotations

import jax
import numpy as np

from jpaged.core.step import SchedulerOutput
from jpaged.models import KVCache


class PageMover:
    def __init__(self, kv_cache: KVCache, num_host_pages: int):
        self.num_host_pages = num_host_pages
        # host pool: each cache array ([L, K, pages, ...]: pages, and a quantized cache's scales)
        # with `num_host_pages` pages, allocated on the first swap-out
        self._host: KVCache | None = None
        self._like = jax.tree.map(lambda a: (a.shape, a.dtype), kv_cache)
        self._copy = jax.jit(_copy_pages, donate_argnames=("kv_cache",))
        self._gather = jax.jit(_gather_pages)
        self._scatter = jax.jit(_scatter_pages, donate_argnames=("kv_cache",))

    def apply(self, out: SchedulerOutput, kv_cache: KVCache) -> KVCache:
        if out.swap_out:
            self._swap_out(kv_cache, out.swap_out)
        if out.swap_in:
            kv_cache = self._swap_in(kv_cache, out.swap_in)
        if out.pages_to_copy:
            src, dst = _padded_pairs(out.pages_to_copy)
            kv_cache = self._copy(kv_cache, src, dst)
        return kv_cache

    def _host_pool(self) -> KVCache:
        if self._host is None:
            self._host = jax.tree.map(
                lambda like: np.zeros((*like[0][:2], self.num_host_pages, *like[0][3:]), like[1]),
                self._like, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2)
        return self._host

    def _swap_out(self, kv_cache: KVCache, moves: list[tuple[int, int]]) -> None:
        device, _ = _padded_pairs(moves)
        host_pages = [h for _, h in moves]
        moved = self._gather(kv_cache, device)                        # [L, K, C, ...] each

        def store(pool, pages):
            pool[:, :, host_pages] = np.asarray(pages)[:, :, :len(moves)]
        jax.tree.map(store, self._host_pool(), moved)

    def _swap_in(self, kv_cache: KVCache, moves: list[tuple[int, int]]) -> KVCache:
        _, device = _padded_pairs(moves)
        host_pages = [h for h, _ in moves]

        def take(pool):
            pages = np.zeros((*pool.shape[:2], len(device), *pool.shape[3:]), pool.dtype)
            pages[:, :, :len(moves)] = pool[:, :, host_pages]
            return pages
        return self._scatter(kv_cache, device, jax.tree.map(take, self._host_pool()))


def _padded_pairs(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(from, to) columns padded to a power of two with (0, 0)."""
    size = 1 << (len(pairs) - 1).bit_length()
    first, second = np.zeros(size, np.int32), np.zeros(size, np.int32)
    first[:len(pairs)], second[:len(pairs)] = zip(*pairs)
    return first, second


def _copy_pages(kv_cache: KVCache, src, dst) -> KVCache:
    """Pages src[i] -> dst[i] of every layer and KV head (and their scales); in place when the
    cache is donated."""
    return jax.tree.map(lambda a: a.at[:, :, dst].set(a[:, :, src]), kv_cache)


def _gather_pages(kv_cache: KVCache, pages) -> KVCache:
    return jax.tree.map(lambda a: a[:, :, pages], kv_cache)


def _scatter_pages(kv_cache: KVCache, pages, moved: KVCache) -> KVCache:
    return jax.tree.map(lambda a, m: a.at[:, :, pages].set(m), kv_cache, moved)
