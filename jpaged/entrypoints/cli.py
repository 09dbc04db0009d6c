"""The `jpaged` command. `jpaged generate` with no arguments is the main job: batched chat
generation on SmolLM2-135M-Instruct, each answer printed, then throughput, KV pages and backend."""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEFAULT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning a new language.",
    "What causes the seasons on Earth?",
    "Translate 'good morning' into Spanish and German.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Name three famous painters and one work by each.",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot.",
    "How do vaccines work?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What are the primary colors?",
    "List the planets of the solar system in order.",
    "How many minutes are in a day? Show the arithmetic.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jpaged", description="PagedAttention inference in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="batched offline generation (the main job)")
    gen.add_argument("--model", default=None,
                     help="converted checkpoint, HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--prompt", action="append", help="a user message (repeatable); default: 16 "
                     "built-in questions")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--page-size", type=int, default=16)
    gen.add_argument("--num-pages", type=int, default=None)
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.add_argument("--attention-backend", default=None,
                     choices=["auto", "reference", "triton", "mosaic"])
    gen.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    gen.add_argument("--quiet", action="store_true", help="only print the summary")
    from jpaged.entrypoints.openai.run import add_quantization_arguments, add_serve_arguments
    add_quantization_arguments(gen)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (and vLLM's /generate)")
    add_serve_arguments(serve)
    sub.add_parser("convert", add_help=False,
                   help="convert an HF directory or a .gguf file into a jpaged checkpoint")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["convert"]:                      # the converter parses its own arguments
        from jpaged.checkpoint.convert import main as convert_main
        return convert_main(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            from jpaged.entrypoints.openai.run import run_server
            return run_server(args)
        return _generate(args)
    except (ValueError, FileNotFoundError) as exc:   # bad input: one clear line, no traceback
        print(f"jpaged: error: {exc}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    from jpaged import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, page_size=args.page_size, num_pages=args.num_pages,
              max_model_len=args.max_model_len, attention_backend=args.attention_backend,
              tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    questions = args.prompt or DEFAULT_QUESTIONS
    conversations = [[{"role": "user", "content": q}] for q in questions]
    engine = llm.llm_engine
    start = time.perf_counter()
    outputs = llm.chat(conversations, params)
    elapsed = time.perf_counter() - start
    if not args.quiet:
        for question, out in zip(questions, outputs):
            print(f"\n### {question}\n{out.outputs[0].text.strip()}")
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_in = sum(len(o.prompt_token_ids) for o in outputs)
    stats = llm.stats()
    compiling = stats.compile_seconds
    print(f"\n{len(outputs)} requests, {num_in} prompt tokens, {num_out} output tokens in "
          f"{elapsed:.2f}s, of which {compiling:.1f}s compiling {stats.num_step_compilations} "
          f"step buckets ({stats.num_compilations} compiled variants with the sampler's)")
    print(f"throughput: {num_out / elapsed:.1f} output tokens/s "
          f"({num_out / max(elapsed - compiling, 1e-9):.1f} excluding compilation)")
    print(f"KV pages used: {stats.peak_kv_pages_used} of {stats.kv_pages_total} at peak "
          f"(page size {stats.kv_page_size}); all free again: {stats.kv_pages_used == 0}")
    print(f"weights: {args.quantization or engine.dtype.name}; KV cache: {args.kv_cache_dtype} "
          f"({stats.kv_cache_tokens} tokens in {stats.kv_cache_bytes / 2**30:.2f} GiB)")
    print(f"attention backend: {engine.attention.name} ({engine.attention.reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
