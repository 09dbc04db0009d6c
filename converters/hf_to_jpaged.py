"""Convert an HF model directory or a .gguf file into a jpaged checkpoint, from a checkout.

    python -m converters.hf_to_jpaged SRC OUT [--dtype bfloat16|float16|float32]

A thin command over `jpaged.checkpoint` (the same as the installed `jpaged convert SRC OUT`).
"""

import sys

from jpaged.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
