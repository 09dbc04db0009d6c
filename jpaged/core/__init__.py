"""The host control plane: free list, refcounts and prefix cache (block_manager.py), continuous
batching (scheduler.py), sequences (sequence.py). Standard library and NumPy only: no jax."""
