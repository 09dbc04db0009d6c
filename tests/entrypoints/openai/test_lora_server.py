"""`jpaged serve --enable-lora` (#19) on the real SmolLM2 in float32, behind an API key: the openai
client selects an adapter by `model` and gets HF's merged-adapter tokens, /v1/models lists the
adapters with the base as their parent, and /v1/load_lora_adapter, /v1/unload_lora_adapter
(--allow-runtime-lora-updating) add and remove adapters while serving."""

from __future__ import annotations

import copy

import httpx
import pytest

from server_utils import RemoteServer

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

MODEL = "smollm2"
KEY = "lora-key"
PROMPT = "The three primary colors are red, blue and yellow. Mixing them gives"
MAX_TOKENS = 8


def make_adapter(model, path, seed, **config):
    config = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **config}
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    wrapped.save_pretrained(path, safe_serialization=True)
    return wrapped.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(smollm2_hf, tmp_path_factory):
    """name -> (path, HF's greedy text with the adapter merged); None: the base model."""
    model, tokenizer = smollm2_hf
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora_server")
    ids = torch.tensor([tokenizer(PROMPT).input_ids])

    def greedy(m):
        with torch.no_grad():
            out = m.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS,
                             min_new_tokens=MAX_TOKENS, eos_token_id=None, pad_token_id=0)
        return tokenizer.decode(out[0, ids.shape[1]:])

    out = {None: (None, greedy(model))}
    for seed, (name, targets) in enumerate({"qv": ["q_proj", "v_proj"],
                                            "mlp": ["gate_proj", "up_proj", "down_proj"]}.items()):
        merged = make_adapter(model, root / name, seed, target_modules=targets)
        out[name] = (str(root / name), greedy(merged))
        del merged
    return out


@pytest.fixture(scope="module")
def server(smollm2_path, adapters, tmp_path_factory):
    srv = RemoteServer([str(smollm2_path), "--served-model-name", MODEL, "--dtype", "float32",
                        "--max-model-len", "256", "--num-pages", "48", "--max-num-seqs", "4",
                        "--max-num-batched-tokens", "128", "--warmup", "none", "--enable-lora",
                        "--lora-modules", f"qv={adapters['qv'][0]}", "--max-loras", "2",
                        "--max-lora-rank", "8", "--allow-runtime-lora-updating"],
                       tmp_path_factory.mktemp("lora_server_log") / "server.log", api_key=KEY)
    yield srv
    assert srv.stop() == 0, srv.log_tail()
    assert "Traceback" not in srv.log_path.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


def complete(client, model):
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                    temperature=0.0, extra_body={"min_tokens": MAX_TOKENS,
                                                                 "ignore_eos": True})
    assert out.model == model                  # the adapter's name for a LoRA request (vLLM's)
    return out.choices[0].text


def test_model_field_selects_adapter_and_models_lists_it(server, client, adapters):
    assert complete(client, "qv") == adapters["qv"][1]
    chat = client.chat.completions.create(model="qv", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2, temperature=0.0)
    assert chat.model == "qv"
    assert complete(client, MODEL) == adapters[None][1] != adapters["qv"][1]
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL, "qv"}
    assert cards["qv"].parent == MODEL and cards["qv"].root == adapters["qv"][0]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(client, "mlp")
    server.wait_idle()


def test_load_and_unload_adapters_at_run_time(server, client, adapters):
    url = f"{server.url}/v1"
    body = {"lora_name": "mlp", "lora_path": adapters["mlp"][0]}
    assert httpx.post(f"{url}/load_lora_adapter", json=body).status_code == 401   # no key
    r = httpx.post(f"{url}/load_lora_adapter", json=body, headers=server.headers)
    assert r.status_code == 200, r.text
    assert complete(client, "mlp") == adapters["mlp"][1]
    again = httpx.post(f"{url}/load_lora_adapter", json=body, headers=server.headers)
    assert again.status_code == 400 and "already been loaded" in again.text
    bad = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"},
                     headers=server.headers)
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "mlp"}, headers=server.headers)
    assert r.status_code == 200, r.text
    assert {m.id for m in client.models.list().data} == {MODEL, "qv"}
    with pytest.raises(openai.NotFoundError):
        complete(client, "mlp")
    gone = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "mlp"},
                      headers=server.headers)
    assert gone.status_code == 404
    assert complete(client, "qv") == adapters["qv"][1]          # the other adapter still serves
    server.wait_idle()
