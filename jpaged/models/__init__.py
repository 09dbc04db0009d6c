"""Models: the one config-driven decoder (decoder.py), its weight layout and accessor (weights.py),
the paged KV cache and step metadata (kv_cache.py), and random-weight checkpoints."""

from jpaged.models.decoder import CausalLM
from jpaged.models.kv_cache import (AttentionFns, AttentionMetadata, KVCache, reference_attention,
                                    slot_mapping)
from jpaged.models.weights import LayerWeights, arrange_layers

__all__ = ["CausalLM", "AttentionFns", "AttentionMetadata", "KVCache", "reference_attention",
           "slot_mapping", "LayerWeights", "arrange_layers"]
