"""jpaged: PagedAttention LLM inference natively in JAX."""
