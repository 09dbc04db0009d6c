"""Checkpoints: HF safetensors and GGUF readers, the declarative weight tables, params, loading.

  weight_map.py  the declarative tables: HF names -> jpaged params, GGUF names -> HF names
  sources.py     readers handing out one HF-named NumPy tensor at a time (safetensors, GGUF)
  params.py      streams a source through the tables into the params pytree
  loader.py      load_checkpoint: a converted checkpoint, an HF directory or a .gguf, in memory
  convert.py     `jpaged convert SRC OUT`: the same tables, saved as an Orbax checkpoint
"""
