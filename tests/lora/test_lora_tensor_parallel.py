"""LoRA under tensor parallelism (#19 item 6): the tiny Llama (2 KV heads) with a PEFT adapter on
a virtual 2-device CPU mesh gives the same greedy tokens as on one device (HF's merged-adapter
tokens), for requests with and without the adapter in one batch; a mesh that must replicate KV heads is refused, naming the fix.

The mesh runs in a subprocess: the device count must be forced before jax is imported."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11], [300, 2, 71, 64, 8],
           [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11]]   # the first again, without the adapter
SCRIPT = """
import json, sys
from jpaged import LLM, LoRARequest, SamplingParams
job = json.loads(sys.argv[1])
out = {}
for tp in job["sizes"]:
    try:
        llm = LLM(job["model"], dtype="float32", page_size=8, num_pages=64, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=64, enable_lora=True, max_loras=1,
                  max_lora_rank=4, tensor_parallel_size=tp)
    except ValueError as exc:
        out[tp] = str(exc)
        continue
    lora = LoRARequest("a", 1, job["adapter"])
    res = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]],
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False, lora_request=[lora, None, None])
    bm = llm.llm_engine.block_manager
    out[tp] = {"tokens": [r.outputs[0].token_ids for r in res],
               "free": bm.num_free_pages == bm.num_usable_pages}
print("RESULT" + json.dumps(out))
"""


def test_tensor_parallel_gives_single_device_tokens(tiny_llama_dir, tiny_llama_hf, tmp_path,
                                                    hf_greedy_batch):
    wrapped = peft.get_peft_model(copy.deepcopy(tiny_llama_hf), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    wrapped.save_pretrained(tmp_path / "a", safe_serialization=True)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    job = {"model": str(tiny_llama_dir), "adapter": str(tmp_path / "a"), "prompts": PROMPTS,
           "sizes": [1, 2, 4]}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(job)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, XLA_FLAGS=flags,
                                                           JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    one, two = result["1"], result["2"]
    assert one["tokens"] == two["tokens"] and one["free"] and two["free"]
    merged = wrapped.merge_and_unload().eval()
    assert one["tokens"][0] == hf_greedy_batch(merged, PROMPTS[:1], 8)[0] != one["tokens"][2]
    assert "replicated to 4" in result["4"] and "divides 2" in result["4"]
