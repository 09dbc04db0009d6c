"""Random paged-KV cases shared by the kernel tests (shape legend: jpaged_kernels/reference.py).

Every slot that a correct kernel must not read (pages no sequence owns, slots past a sequence's
context, other layers) holds POISON, so a masking or indexing bug shows up as a large error
instead of hiding inside random noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

POISON = 64.0
ON_GPU = jax.devices()[0].platform == "gpu"
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="compiled Triton kernels need a GPU")
# interpret=True everywhere; interpret=False (compiled) only where a GPU is present.
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="compiled", marks=requires_gpu)]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def random_tables(rng, context_lens, page_size, pages_per_seq, num_pages, padding="arbitrary"):
    """block_tables [B, P]: distinct real pages (never the null page 0); padding entries are
    arbitrary pages ("arbitrary") or out-of-range garbage ("garbage"). Also returns the live mask
    [num_pages, S] of slots some sequence owns."""
    needed = [-(-int(c) // page_size) for c in context_lens]
    real = iter(rng.permutation(np.arange(1, num_pages))[:sum(needed)])
    if padding == "garbage":
        tables = rng.choice([-1, num_pages, 2**30], size=(len(needed), pages_per_seq))
    else:
        tables = rng.integers(0, num_pages, size=(len(needed), pages_per_seq))
    live = np.zeros((num_pages, page_size), bool)
    for i, (n, c) in enumerate(zip(needed, context_lens)):
        for j in range(n):
            tables[i, j] = next(real)
            live[tables[i, j], : min(page_size, int(c) - j * page_size)] = True
    return jnp.asarray(tables, jnp.int32), live


def random_cache(rng, live, num_kv_heads, head_dim, dtype, num_layers=None, layer=None):
    """k, v [K, num_pages, S, H] (or [L, ...] with only `layer` live), poisoned where not live."""
    num_pages, page_size = live.shape
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    if num_layers is not None:
        shape = (num_layers, *shape)
        live = ((np.arange(num_layers)[:, None, None] == layer) & live)[:, None, :, :, None]
    else:
        live = live[None, :, :, None]
    out = []
    for _ in range(2):
        x = rng.standard_normal(shape).astype(np.float32)
        out.append(jnp.asarray(np.where(live, x, POISON), dtype))
    return out


def quantize_cache(pages, kv_dtype):
    """NumPy per-vector quantization (independent of jpaged_kernels): pages [..., S, H] float ->
    (q [..., S, H] in kv_dtype, scales [..., S] float16) with max |x| of each vector mapped to the
    type's largest value; the scale is rounded to float16 before dividing, as the cache stores it."""
    x = np.asarray(pages, np.float32)
    top = float(np.iinfo(kv_dtype).max if np.issubdtype(kv_dtype, np.integer)
                else jnp.finfo(kv_dtype).max)
    scale = (np.abs(x).max(axis=-1) / top).astype(np.float16).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale)
    q = x / scale[..., None]
    if np.issubdtype(kv_dtype, np.integer):
        q = np.clip(np.rint(q), -top, top)
    return jnp.asarray(q.astype(np.float32), kv_dtype), jnp.asarray(scale, jnp.float16)


def quantized_inputs(k, v, kv_dtype, kwargs: dict, fp8_as_bits: bool = True):
    """A case's float pages as a quantized cache: (k, v for the kernel, k, v for the oracle). The
    oracle sees the exact values the quantized pages hold; the scales go into `kwargs`, and
    float8 pages become their uint8 bit patterns (with `fp8_dtype`) as the engine stores them."""
    from dense_oracle import dequantized_pages
    from jpaged_kernels.reference import as_bits
    (k, k_scale), (v, v_scale) = quantize_cache(k, kv_dtype), quantize_cache(v, kv_dtype)
    kwargs.update(k_scale=k_scale, v_scale=v_scale)
    oracle_k, oracle_v = dequantized_pages(k, k_scale), dequantized_pages(v, v_scale)
    if fp8_as_bits and kv_dtype != jnp.int8:
        k, v, kwargs["fp8_dtype"] = as_bits(k), as_bits(v), kv_dtype
    return k, v, oracle_k, oracle_v


def random_sinks(rng, num_heads):
    """[N] float32 attention sinks on the scale of the scores (some dominate, some vanish)."""
    return jnp.asarray(2.0 * rng.standard_normal(num_heads), jnp.float32)


def random_q(rng, num_tokens, num_heads, head_dim, dtype):
    return jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), dtype)


def assert_close(out, ref, dtype):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=tol, rtol=tol)


def triton_kernel_ir(lowered) -> tuple[tuple[int, int, int], str]:
    """The grid and the Triton IR (TTIR, as text) of the one Pallas Triton call in a lowered jit.

    The lowering embeds the kernel's TTIR as MLIR bytecode in the custom call's backend config;
    parsing it back (with JAX's own Triton dialect) lets a test on CPU check what the GPU would
    compile: tile shapes of the dots, masked loads, the grid.
    """
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect

    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call":
                        calls.append(child.operation)
                    walk(child.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    configs = [c.attributes["mhlo.backend_config"] for c in calls
               if ir.StringAttr(c.attributes["call_target_name"]).value == "__gpu$xla.gpu.triton"]
    assert len(configs) == 1, f"expected one Triton call, found {len(configs)}"
    config = configs[0]
    grid = tuple(ir.IntegerAttr(config[f"grid_{axis}"]).value for axis in "xyz")
    context = ir.Context()
    dialect.register_dialect(context)
    with context:
        module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
        return grid, module.operation.get_asm(enable_debug_info=False)


def tt_dots(ttir: str) -> list[str]:
    """'AxB * BxC -> AxC' (element type dropped) for every tt.dot, in program order."""
    import re
    pattern = r"tt\.dot .*: tensor<(\d+x\d+)x\w+> \* tensor<(\d+x\d+)x\w+> -> tensor<(\d+x\d+)x\w+>"
    return [f"{a} * {b} -> {c}" for a, b, c in re.findall(pattern, ttir)]


def masked_loads(ttir: str, shape: str) -> int:
    """How many tt.load ops of a pointer tensor of `shape` (e.g. '16x8x64') carry a mask."""
    import re
    return len(re.findall(rf"tt\.load %\w+, %\w+(?:, %\w+)? : tensor<{shape}x!tt\.ptr", ttir))
