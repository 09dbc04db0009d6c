"""Models: the one config-driven Llama-family Flax model (llama.py) and random-weight checkpoints."""
