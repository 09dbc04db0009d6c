"""Chooses the attention implementation the model runs: Pallas GPU kernels or the jnp reference.

Requested by `LLM(..., attention_backend=...)` or, when that is None, the JPAGED_ATTENTION
environment variable read when the engine starts; "auto" (the default) takes the Triton kernels on a
GPU when they lower and compute correctly on a tiny probe, and the reference otherwise. The choice
and the reason are logged once.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.models.llama import AttentionFns, reference_attention

logger = logging.getLogger("jpaged")
BACKENDS = ("auto", "reference", "triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    name: str        # "reference" | "triton" | "mosaic"
    reason: str
    fns: AttentionFns


def select_attention(requested: str | None = None) -> AttentionChoice:
    requested = (requested or os.environ.get("JPAGED_ATTENTION") or "auto").lower()
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend={requested!r} is not one of {BACKENDS}")
    platform = jax.devices()[0].platform
    if requested == "reference":
        choice = AttentionChoice("reference", "requested", reference_attention())
    elif requested == "mosaic":
        raise ValueError("attention_backend='mosaic' is not available in this build of jpaged yet; "
                         "use 'triton' (GPU) or 'reference'")
    elif platform != "gpu":
        if requested == "triton":
            logger.warning("attention_backend='triton' needs a GPU but the device is %s; "
                           "falling back to the reference attention", platform)
        choice = AttentionChoice("reference", f"no GPU (platform {platform}); Pallas GPU kernels "
                                 "need one", reference_attention())
    else:
        choice = _try_triton(requested)
    logger.info("attention backend: %s (%s)", choice.name, choice.reason)
    return choice


def _try_triton(requested: str) -> AttentionChoice:
    try:
        import jpaged_kernels
        fns = AttentionFns(jpaged_kernels.paged_attention, jpaged_kernels.ragged_paged_attention)
        _probe(fns)
    except Exception as exc:  # lowering errors vary by JAX version; any of them means fall back
        logger.warning("the Pallas Triton kernels failed to lower or to match the reference on this "
                       "GPU with JAX %s (%s: %s); falling back to the reference attention",
                       jax.__version__, type(exc).__name__, str(exc).splitlines()[0][:200])
        return AttentionChoice("reference", "Triton kernels unavailable", reference_attention())
    return AttentionChoice("triton", "GPU detected" if requested == "auto" else "requested", fns)


def _probe(fns: AttentionFns) -> None:
    """Run both kernels once on tiny inputs and compare with the reference."""
    ref = reference_attention()
    rng = np.random.default_rng(0)
    k_pages = jnp.asarray(rng.standard_normal((2, 8, 16, 64)), jnp.bfloat16)
    v_pages = jnp.asarray(rng.standard_normal((2, 8, 16, 64)), jnp.bfloat16)
    block_tables = jnp.asarray([[1, 3, 5, 0], [2, 4, 6, 7]], jnp.int32)
    context_lens = jnp.asarray([37, 64], jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16)
    got = fns.paged_attention(q, k_pages, v_pages, block_tables, context_lens)
    want = ref.paged_attention(q, k_pages, v_pages, block_tables, context_lens)
    qsl = jnp.asarray([0, 1, 2], jnp.int32)
    got_r = fns.ragged_paged_attention(q, k_pages, v_pages, block_tables, context_lens, qsl)
    for name, a in (("paged_attention", got), ("ragged_paged_attention", got_r)):
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - want.astype(jnp.float32))))
        if not err < 5e-2:
            raise RuntimeError(f"{name} differs from the reference by {err}")
