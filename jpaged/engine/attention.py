"""Chooses the attention implementation the model runs: Pallas GPU kernels or the jnp reference.

Requested by `LLM(..., attention_backend=...)` or, when that is None, the JPAGED_ATTENTION
environment variable read when the engine starts.
  - "auto" (the default) takes the Triton kernels on a GPU when they lower and agree with the
    reference on a probe, else the reference, with a warning when a GPU was there but unusable.
  - "triton" (or "mosaic") is a promise: it raises with the reason when it cannot be kept.
  - "reference" always works.
NOTE: the probe makes the engine's real call: the model's head counts, head dim, dtype and page
size, the `[L, ...]` cache read through `layer=`, the sliding window, soft cap and scale, inside
`jax.jit`; so a kernel that cannot serve this model fails at start-up, not at the first step.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.models import AttentionFns, reference_attention

logger = logging.getLogger("jpaged")
BACKENDS = ("auto", "reference", "triton", "mosaic")
_PROBE_TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2, "float16": 1e-2}


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    name: str        # "reference" | "triton" | "mosaic"
    reason: str
    fns: AttentionFns


@dataclasses.dataclass(frozen=True)
class ProbeShape:
    """What the model will ask of the kernels (from its ModelConfig and the engine's settings)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    page_size: int
    sliding_window: int | None = None       # the model's (its smallest, when layers differ)
    soft_cap: float | None = None
    scale: float | None = None


def select_attention(requested: str | None, probe: ProbeShape, *, platform: str | None = None,
                     triton_fns: AttentionFns | None = None) -> AttentionChoice:
    """`platform` (default: the first device's) and `triton_fns` (default: jpaged_kernels' Triton
    kernels) are parameters so each branch can be exercised without a GPU."""
    requested = (requested or os.environ.get("JPAGED_ATTENTION") or "auto").lower()
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend={requested!r} is not one of {BACKENDS}; pass one of "
                         f"them (or unset JPAGED_ATTENTION)")
    platform = platform or jax.devices()[0].platform
    if requested == "reference":
        choice = AttentionChoice("reference", "requested", reference_attention())
    elif requested == "mosaic":
        raise ValueError("attention_backend='mosaic': the Mosaic GPU kernel is not available in this "
                         "build of jpaged yet; use 'triton' (GPU), 'reference' or 'auto'")
    elif platform != "gpu":
        if requested == "triton":
            raise ValueError(f"attention_backend='triton' needs a GPU, but the device is {platform}; "
                             f"use 'auto' or 'reference' here")
        choice = AttentionChoice("reference", f"no GPU (platform {platform}); Pallas GPU kernels "
                                 "need one", reference_attention())
    else:
        choice = _try_triton(requested, probe, triton_fns or _triton_kernels())
    logger.info("attention backend: %s (%s)", choice.name, choice.reason)
    return choice


def _triton_kernels() -> AttentionFns:
    import jpaged_kernels
    return AttentionFns(jpaged_kernels.paged_attention, jpaged_kernels.ragged_paged_attention)


def _try_triton(requested: str, probe: ProbeShape, fns: AttentionFns) -> AttentionChoice:
    try:
        probe_kernels(fns, probe)
    except Exception as exc:  # lowering errors vary by JAX version; any of them is a failure
        reason = (f"the Pallas Triton kernels failed on this GPU with JAX {jax.__version__} for "
                  f"{probe}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        if requested == "triton":
            raise RuntimeError(f"attention_backend='triton' cannot be used: {reason}; use 'auto' "
                               f"to fall back to the reference attention") from exc
        logger.warning("%s; falling back to the reference attention", reason)
        return AttentionChoice("reference", "Triton kernels unavailable", reference_attention())
    return AttentionChoice("triton", "GPU detected" if requested == "auto" else "requested", fns)


def probe_kernels(fns: AttentionFns, probe: ProbeShape, num_layers: int = 2) -> None:
    """Run both kernels jitted, through `layer=`, on a small random paged cache with the model's
    shapes, and compare with the reference; raise naming the kernel and the error."""
    ref = reference_attention()
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(probe.dtype)
    k, g, h, s = probe.num_kv_heads, probe.num_heads, probe.head_dim, probe.page_size
    num_pages = 9
    cache_shape = (num_layers, k, num_pages, s, h)
    k_pages = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    v_pages = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    block_tables = jnp.asarray([[1, 3, 5, 0], [2, 4, 6, 7]], jnp.int32)
    context_lens = jnp.asarray([2 * s + 5, 4 * s], jnp.int32)
    query_start_loc = jnp.asarray([0, 3, 4], jnp.int32)           # a 3-token chunk and a decode
    layer = jnp.int32(num_layers - 1)
    kwargs = dict(layer=layer, sliding_window=probe.sliding_window)
    kwargs.update({k: v for k, v in (("soft_cap", probe.soft_cap), ("scale", probe.scale))
                   if v is not None})
    q_decode = jnp.asarray(rng.standard_normal((2, g, h)), dtype)
    q_ragged = jnp.asarray(rng.standard_normal((4, g, h)), dtype)
    cases = {
        "paged_attention": lambda f: f.paged_attention(q_decode, k_pages, v_pages, block_tables,
                                                       context_lens, **kwargs),
        "ragged_paged_attention": lambda f: f.ragged_paged_attention(
            q_ragged, k_pages, v_pages, block_tables, context_lens, query_start_loc, **kwargs),
    }
    tolerance = _PROBE_TOLERANCE[dtype.name]
    for name, call in cases.items():
        got = np.asarray(jax.jit(lambda: call(fns))(), np.float32)
        want = np.asarray(call(ref), np.float32)
        err = float(np.max(np.abs(got - want)))
        if not err <= tolerance:          # also catches NaN
            raise RuntimeError(f"{name} differs from the reference by {err:.3g} (tolerance "
                               f"{tolerance})")
