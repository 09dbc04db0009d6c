"""Paged-attention kernels for jpaged: pure-jnp references and Pallas GPU kernels."""

from jpaged_kernels import reference
from jpaged_kernels.reference import write_kv
from jpaged_kernels.triton_paged_attention import paged_attention
from jpaged_kernels.triton_ragged_paged_attention import ragged_paged_attention

__all__ = ["reference", "write_kv", "paged_attention", "ragged_paged_attention"]
