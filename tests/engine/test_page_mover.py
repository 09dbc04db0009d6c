"""The page mover: copy-on-write copies, swap out to the host pool and back, in the order the
scheduler relies on, on a cache whose every page holds its own values."""

import jax.numpy as jnp
import numpy as np

from jpaged.core.step import SchedulerOutput
from jpaged.engine.page_mover import PageMover
from jpaged.models import KVCache

L, K, P, S, H = 2, 3, 9, 2, 4


def numbered_cache() -> KVCache:
    """k[l, h, p] all equal to 1000 l + 100 h + p (v: the negative), so a page's identity shows."""
    base = (1000 * np.arange(L)[:, None, None] + 100 * np.arange(K)[None, :, None]
            + np.arange(P)[None, None, :]).astype(np.float32)
    k = np.broadcast_to(base[..., None, None], (L, K, P, S, H)).copy()
    return KVCache(jnp.asarray(k), jnp.asarray(-k))


def page_ids(cache: KVCache) -> list[int]:
    """Which original page each page's contents came from (read off layer 0, head 0)."""
    return np.asarray(cache.k[0, 0, :, 0, 0]).astype(int).tolist()


def test_copies_land_on_every_layer_and_head():
    cache, mover = numbered_cache(), PageMover(numbered_cache(), num_host_pages=0)
    cache = mover.apply(SchedulerOutput([], [], pages_to_copy=[(2, 4), (2, 5), (7, 1)]), cache)
    assert page_ids(cache) == [0, 7, 2, 3, 2, 2, 6, 7, 8]
    want = numbered_cache()
    for dst, src in ((4, 2), (5, 2), (1, 7)):
        np.testing.assert_array_equal(cache.k[:, :, dst], want.k[:, :, src])
        np.testing.assert_array_equal(cache.v[:, :, dst], want.v[:, :, src])


def test_swap_out_then_in_moves_contents_through_the_host_pool():
    cache, mover = numbered_cache(), PageMover(numbered_cache(), num_host_pages=4)
    # out: device 3 -> host 0, device 6 -> host 2; the freed device pages are then rewritten
    cache = mover.apply(SchedulerOutput([], [], swap_out=[(3, 0), (6, 2)]), cache)
    cache = mover.apply(SchedulerOutput([], [], pages_to_copy=[(1, 3), (1, 6)]), cache)
    assert page_ids(cache) == [0, 1, 2, 1, 4, 5, 1, 7, 8]
    # in: host 2 -> device 8, host 0 -> device 5, in the same step as a copy
    cache = mover.apply(SchedulerOutput([], [], swap_in=[(2, 8), (0, 5)],
                                        pages_to_copy=[(8, 2)]), cache)
    assert page_ids(cache) == [0, 1, 6, 1, 4, 3, 1, 7, 6]   # the copy reads the swapped-in page
    want = numbered_cache()
    np.testing.assert_array_equal(cache.v[:, :, 5], want.v[:, :, 3])
    np.testing.assert_array_equal(cache.k[:, :, 8], want.k[:, :, 6])
