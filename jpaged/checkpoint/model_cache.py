"""A converted copy of each `.gguf` file, so a start loads it instead of dequantizing again.

NOTE: the key is the file's SHA-256 (not its path or mtime), the params dtype and the params
layout version: `<cache>/models/<stem>-<sha256[:16]>-<dtype>-layout<N>/` holds a jpaged checkpoint (jpaged_config.json,
config.json, tokenizer files) whose params are one safetensors file, params.safetensors, rather
than Orbax's params/: it loads several times faster, and `LLM(entry)` reads either form. It is
written into a temporary sibling directory and renamed into place, so a crash or a concurrent
writer never leaves a half-written entry under the final name.
See jpaged/cache_dirs.py for the place and for $JPAGED_MODEL_CACHE_DIR=off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from jpaged.cache_dirs import resolve_cache_dir
from jpaged.config import PARAMS_LAYOUT

logger = logging.getLogger("jpaged")
ENV_VAR = "JPAGED_MODEL_CACHE_DIR"
_COMPLETE = "jpaged_config.json"     # written last by write_checkpoint: its presence means whole
_pending: dict[Path, threading.Thread] = {}   # entries being written by this process


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_entry(gguf_path: Path, dtype: str, cache_dir: str | None = None) -> Path | None:
    """The cache directory for this file and dtype (it may not exist yet); None if caching is off."""
    root = resolve_cache_dir(cache_dir, ENV_VAR, "models")
    if root is None:
        return None
    return root / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}-{dtype}-layout{PARAMS_LAYOUT}"


def is_complete(entry: Path) -> bool:
    """Whether `entry` holds a whole conversion (waiting for this process's own write of it)."""
    pending = _pending.get(entry)
    if pending is not None:
        pending.join()
    return _is_whole(entry)


def _is_whole(entry: Path) -> bool:
    return (entry / _COMPLETE).is_file() and (entry / "params.safetensors").is_file()


def store_in_background(entry: Path, write) -> None:
    """`store` on a (non-daemon) thread: the model is already in memory, so the caller goes on
    (compiling, generating) while the copy is written; the process exits only once it is whole."""
    thread = threading.Thread(target=store, args=(entry, write), name="jpaged-model-cache")
    _pending[entry] = thread
    thread.start()


def wait() -> None:
    """Block until this process's background writes are done."""
    for thread in list(_pending.values()):
        thread.join()


def store(entry: Path, write) -> None:
    """Run `write(tmp_dir)` and move the result to `entry`; failures only log (the cache is an
    optimisation: a read-only or full disk must not stop the model from loading)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.partial-"))
    except OSError as error:
        logger.warning("model cache: cannot write under %s (%s); continuing without it",
                       entry.parent, error)
        return
    try:
        write(tmp)
        if entry.is_dir() and not _is_whole(entry):   # a stale entry (crash, older layout)
            shutil.rmtree(entry, ignore_errors=True)
        os.rename(tmp, entry)                # atomic; fails if another process got there first
        logger.info("model cache: stored a converted copy at %s", entry)
    except Exception as error:           # noqa: BLE001 - the load goes on from memory
        logger.warning("model cache: could not store %s (%s: %s)", entry, type(error).__name__, error)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
