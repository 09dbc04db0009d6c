"""Checkpoint converters: HF model directories and GGUF files -> jpaged checkpoints.

`python -m converters.hf_to_jpaged SRC OUT [--dtype ...]` (or `converters.hf_to_jpaged.convert`) writes
a checkpoint to disk; `jpaged.loader.load_checkpoint` runs the same tables in memory.

  weight_map.py    the declarative tables: HF names -> jpaged params, GGUF names -> HF names
  sources.py       readers handing out one HF-named NumPy tensor at a time (safetensors, GGUF)
  hf_to_jpaged.py  streams a source through the tables; Orbax save; the CLI

(Nothing is imported here, so `python -m converters.hf_to_jpaged` runs its module only once.)
"""
