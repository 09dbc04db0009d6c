"""JAX's persistent compilation cache, turned on when an engine starts (never at import).

The step buckets and the sampler variants are compiled once per machine and then loaded from
disk: a warm start skips XLA compilation. The directory is `LLM(compilation_cache_dir=...)`, else
$JPAGED_COMPILATION_CACHE_DIR, else <jpaged cache root>/xla (~/.cache/jpaged/xla; see
jpaged/cache_dirs.py); "off" turns it off.

NOTE: the cache is JAX's global config, for the whole process. A directory the user already gave
JAX (`jax_compilation_cache_dir`) is left as it is. Turning the cache on lowers JAX's minimum
compile time for caching to 0 s so the small sampler executables are cached too. An engine started
with the cache off does not turn off a cache another engine (or the user) turned on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from jpaged.cache_dirs import resolve_cache_dir

logger = logging.getLogger("jpaged")
ENV_VAR = "JPAGED_COMPILATION_CACHE_DIR"


def enable_compilation_cache(directory: str | None) -> Path | None:
    """Point JAX's persistent cache at the resolved directory; returns the directory in use (or
    None when off)."""
    path = resolve_cache_dir(directory, ENV_VAR, "xla")
    current = jax.config.jax_compilation_cache_dir
    if path is None:
        return Path(current) if current else None
    if current and Path(current) != path:
        logger.info("compilation cache: keeping JAX's jax_compilation_cache_dir=%s", current)
        return Path(current)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        logger.warning("compilation cache: cannot create %s (%s); compiling without it", path, error)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    logger.info("compilation cache: %s (compilation_cache_dir='off' or %s=off to disable)",
                path, ENV_VAR)
    return path
