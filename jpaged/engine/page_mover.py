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
        # host pool [L, K, host pages, S, H] for K and V, allocated on the first swap-out
        self._host: tuple[np.ndarray, np.ndarray] | None = None
        self._shape = kv_cache.k.shape
        self._dtype = kv_cache.k.dtype
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

    def _host_pool(self) -> tuple[np.ndarray, np.ndarray]:
        if self._host is None:
            layers, heads, _, page_size, head_dim = self._shape
            shape = (layers, heads, self.num_host_pages, page_size, head_dim)
            self._host = (np.zeros(shape, self._dtype), np.zeros(shape, self._dtype))
        return self._host

    def _swap_out(self, kv_cache: KVCache, moves: list[tuple[int, int]]) -> None:
        device, _ = _padded_pairs(moves)
        host_pages = [h for _, h in moves]
        k, v = self._gather(kv_cache, device)                         # [L, K, C, S, H] each
        host_k, host_v = self._host_pool()
        host_k[:, :, host_pages] = np.asarray(k)[:, :, :len(moves)]
        host_v[:, :, host_pages] = np.asarray(v)[:, :, :len(moves)]

    def _swap_in(self, kv_cache: KVCache, moves: list[tuple[int, int]]) -> KVCache:
        _, device = _padded_pairs(moves)
        host_pages = [h for h, _ in moves]
        host_k, host_v = self._host_pool()
        k = np.zeros((*host_k.shape[:2], len(device), *host_k.shape[3:]), host_k.dtype)
        v = np.zeros_like(k)
        k[:, :, :len(moves)], v[:, :, :len(moves)] = host_k[:, :, host_pages], host_v[:, :, host_pages]
        return self._scatter(kv_cache, device, k, v)


def _padded_pairs(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(from, to) columns padded to a power of two with (0, 0)."""
    size = 1 << (len(pairs) - 1).bit_length()
    first, second = np.zeros(size, np.int32), np.zeros(size, np.int32)
    first[:len(pairs)], second[:len(pairs)] = zip(*pairs)
    return first, second


def _copy_pages(kv_cache: KVCache, src, dst) -> KVCache:
    """Pages src[i] -> dst[i] of every layer and KV head; in place when the cache is donated."""
    return KVCache(kv_cache.k.at[:, :, dst].set(kv_cache.k[:, :, src]),
                   kv_cache.v.at[:, :, dst].set(kv_cache.v[:, :, src]))


def _gather_pages(kv_cache: KVCache, pages):
    return kv_cache.k[:, :, pages], kv_cache.v[:, :, pages]


def _scatter_pages(kv_cache: KVCache, pages, k, v) -> KVCache:
    return KVCache(kv_cache.k.at[:, :, pages].set(k), kv_cache.v.at[:, :, pages].set(v))
