"""`jpaged serve` whose engine step fails on purpose (a test fixture, run as a script):

    python faulty_server.py MARKER serve MODEL ...

A step that runs a request whose prompt text contains MARKER raises after the jitted step has
consumed the donated KV cache, the worst case for recovery. The server tests use it to show that
such a failure fails just the requests of that step (HTTP 500), that the cache is rebuilt, and
that the server keeps serving. The wrapping happens here, in the test's own process, not in jpaged.
"""

import sys

import jax

from jpaged.engine.engine import LLMEngine
from jpaged.engine.runner import ModelRunner
from jpaged.entrypoints.cli import main

MARKER = sys.argv.pop(1)
_marked: set[str] = set()          # request ids whose prompt holds the marker
_add_request, _execute = LLMEngine.add_request, ModelRunner.execute


def add_request(self, request_id, prompt, params=None, **kwargs):
    text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
    if isinstance(text, str) and MARKER in text:
        _marked.add(request_id)
    return _add_request(self, request_id, prompt, params, **kwargs)


def execute(self, out):
    result = _execute(self, out)
    if any(row.request_id in _marked for row in out.scheduled):
        for leaf in jax.tree.leaves(self.kv_cache):
            leaf.delete()
        raise RuntimeError(f"injected step failure (prompt containing {MARKER!r})")
    return result


LLMEngine.add_request, ModelRunner.execute = add_request, execute
sys.exit(main(sys.argv[1:]))
