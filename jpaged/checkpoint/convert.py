"""Convert an HF model directory or a .gguf file into a jpaged checkpoint on disk.

    jpaged convert SRC OUT [--dtype bfloat16|float16|float32] [--quantization int8|w8a8|int4|fp8|gguf]
    (a GPTQ / AWQ / compressed-tensors HF checkpoint keeps its quantized layers as stored)
    python -m converters.hf_to_jpaged SRC OUT [--dtype ...]     (the same, from a checkout)

OUT gets `params/` (an Orbax checkpoint of the CausalLM params pytree), `jpaged_config.json`, the
source's config.json (synthesized in HF style for a GGUF), generation_config.json when the source has
one, and the tokenizer files when it has a tokenizer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jpaged.checkpoint.params import (PARAMS_FILE, build_params, resolve_dtype, save_params,
                                      save_params_file)
from jpaged.checkpoint.quantized import QUANTIZATIONS
from jpaged.checkpoint.sources import open_source
from jpaged.config import SUPPORTED_DTYPES


def convert(src: str | Path, out: str | Path, dtype: str | None = None, progress: bool = True,
            quantization: str | None = None, group_size: int | None = None) -> Path:
    """Convert SRC (an HF directory or a .gguf file) into the jpaged checkpoint directory OUT;
    with `quantization` (checkpoint/quantized.py) the matmul weights are stored quantized, in one
    params.safetensors file instead of Orbax's params/."""
    from jpaged.checkpoint.loader import check_quantization, stored_quantization
    source = open_source(src)
    config = source.config
    check_quantization(quantization, Path(src))
    if source.kind == "hf":           # GPTQ / AWQ / compressed-tensors: kept as stored
        quantization = stored_quantization(source, quantization)
    dtype = resolve_dtype(dtype or source.default_dtype)
    out = Path(out)
    for existing in ("params", PARAMS_FILE):
        if (out / existing).exists():
            raise FileExistsError(f"{out / existing} already exists: remove it or choose another "
                                  f"OUT")
    params = build_params(source, config, dtype, progress=progress, quantization=quantization,
                          group_size=group_size)               # fails before OUT is touched
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(source, params, out, params_file=quantization is not None,
                     quantization=quantization)
    return out


def write_checkpoint(source, params: dict, out: Path, tokenizer=None, params_file: bool = False,
                     quantization: str | None = None) -> None:
    """Write params, configs and tokenizer files of an opened source into the directory OUT.
    `tokenizer`: an already loaded one to save (else the source saves its own). `params_file`:
    params as one safetensors file (params.safetensors, faster to load) instead of Orbax params/.

    NOTE: jpaged_config.json is written last: the model cache takes its presence to mean whole.
    """
    if params_file:
        save_params_file(out / PARAMS_FILE, params, quantization)
    else:
        save_params(out / "params", params)
    source.save_config_files(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    else:
        source.save_tokenizer(out)
    source.config.to_json(out / "jpaged_config.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jpaged convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HF model directory (config.json + *.safetensors) or .gguf file")
    parser.add_argument("out", help="output directory for the jpaged checkpoint")
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None,
                        help="parameter dtype (default: the checkpoint's torch_dtype, else float32)")
    parser.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default=None,
                        help="store the matmul weights quantized (gguf: a .gguf's as stored)")
    parser.add_argument("--quantization-group-size", type=int, default=None,
                        help="int4's group size (default 32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert(args.src, args.out, args.dtype, quantization=args.quantization,
                      group_size=args.quantization_group_size)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
