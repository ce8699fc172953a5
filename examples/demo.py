"""The main job on the default model pair: start a verifier, generate on the edge, print text and stats.

    python examples/demo.py                  # embedded pair, the PipeSD policy
    python examples/demo.py --pair smollm2   # SmolLM2-135M-Instruct (needs: make smollm2)
    python examples/demo.py --compare        # also run vanilla, cloud_only and edge_only on each prompt

The verifier runs as a real uvicorn process on loopback (random free port) and is
stopped at the end; the edge drafts with llama.cpp and sends drafts over HTTP.
"""

from __future__ import annotations

import argparse
import textwrap

from cloud_verifier import LocalVerifier
from edge_sdk import MODES, EdgeClient

EMBEDDED_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    \"\"\"A last-in, first-out container.\"\"\"\n\n    def __init__(self):\n",
    "    def __repr__(self):\n        return",
]
# SmolLM2 is an instruct model: prompts go through its chat template (EdgeClient.chat renders the GGUF's own).
SMOLLM2_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for writing clear code.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="embedded", choices=["embedded", "smollm2"])
    ap.add_argument("--mode", default="pipesd", choices=MODES)
    ap.add_argument("-k", "--draft-k", type=int, help="draft length of --mode vanilla (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--compare", action="store_true", help="also run vanilla, cloud_only and edge_only")
    args = ap.parse_args()

    chat = args.pair == "smollm2"
    prompts = SMOLLM2_PROMPTS if chat else EMBEDDED_PROMPTS
    modes = [args.mode] + ([m for m in ("vanilla", "cloud_only", "edge_only") if m != args.mode]
                           if args.compare else [])
    print(f"starting the verifier ({args.pair} target) on loopback ...", flush=True)
    with LocalVerifier(model=args.pair, threads=1) as verifier:
        print(f"verifier ready at {verifier.url}\n")
        with EdgeClient(verifier.url, verifier_key=verifier.public_key, pair=args.pair, mode=args.mode,
                        draft_k=args.draft_k, threads=1) as client:
            for prompt in prompts:
                for mode in modes:
                    if chat:
                        result = client.chat([{"role": "user", "content": prompt}],
                                             max_new_tokens=args.max_new_tokens, mode=mode)
                    else:
                        result = client.generate(prompt, max_new_tokens=args.max_new_tokens, mode=mode)
                    print(f"--- prompt: {prompt!r}  [{mode}]")
                    print(textwrap.indent((prompt + "\n" if chat else prompt) + result.text, "  | ", lambda line: True))
                    print(f"  stats: {result.stats.summary()}\n")


if __name__ == "__main__":
    main()
