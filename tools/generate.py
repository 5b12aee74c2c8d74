"""Sample text from a training checkpoint, run dir or HF Olmo2 folder.

    python tools/generate.py runs/tiny --prompt "def " --max-new-tokens 64 --temperature 0.8 --top-k 50
    python tools/generate.py hf/tiny --prompt "import " --temperature 0          # greedy

Decoding uses a KV cache (--no-cache re-runs the whole sequence per token, to check it); the same
--seed gives the same text.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from olmo_mini.interop import generate_text, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("--prompt", default="", help="text to continue (empty: a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="decode without the KV cache")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 (surrogate-escaped)
        print(f"error: --prompt {os.fsencode(args.prompt)!r}: not UTF-8 text", file=sys.stderr)
        return 1
    try:
        text = generate_text(
            load(args.source),
            args.prompt,
            args.max_new_tokens,
            args.device,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            use_cache=not args.no_cache,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
