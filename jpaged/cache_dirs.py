"""Where jpaged keeps what it can reuse across processes, and how to turn each cache off.

    root          $JPAGED_CACHE_DIR, else $XDG_CACHE_HOME/jpaged, else ~/.cache/jpaged
    xla/          JAX's persistent compilation cache (the step buckets and the sampler)
                  overridden by LLM(compilation_cache_dir=...) or $JPAGED_COMPILATION_CACHE_DIR
    models/       converted copies of .gguf files, keyed by the file's SHA-256 and the dtype
                  overridden by $JPAGED_MODEL_CACHE_DIR

Any of the overrides set to "off" (or "0", "false", "none", "") turns that cache off. The variables
are read when a model is loaded or an engine starts, never at import.
"""

from __future__ import annotations

import os
from pathlib import Path

_OFF = {"off", "0", "false", "none", ""}


def cache_root() -> Path:
    if os.environ.get("JPAGED_CACHE_DIR"):
        return Path(os.environ["JPAGED_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jpaged"


def resolve_cache_dir(explicit: str | os.PathLike | None, env_var: str, default_subdir: str
                      ) -> Path | None:
    """`explicit` if given, else $env_var if set, else cache_root()/default_subdir; None when the
    chosen value is one of the "off" spellings."""
    value = explicit if explicit is not None else os.environ.get(env_var)
    if value is None:
        return cache_root() / default_subdir
    if str(value).strip().lower() in _OFF:
        return None
    return Path(value).expanduser()
