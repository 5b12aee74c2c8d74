"""Tokenize a corpus into pre-tokenized shards (flat uint16/uint32 + doc boundaries + manifest).

    python tools/prepare_data.py --output shards/stdlib                          # the stdlib
    python tools/prepare_data.py --input 'data/*.jsonl' --tokenizer tok/ --output shards/mine
    python tools/prepare_data.py --hf-path HuggingFaceFW/fineweb-edu --hf-name sample-10BT \\
        --max-docs 1000000 --tokenizer allenai/OLMo-2-1124-7B-local-folder --output shards/fw

Train with ``data=shards data.shards=shards/mine`` (a local folder or an fsspec URL after upload).
Tokenization runs in ``--procs`` processes; the bytes written do not depend on that number.
``python tools/prepare_data.py --verify shards/mine`` checks every shard's size and digest
against the manifest (exit status 1 on a mismatch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from olmo_mini.data.cli import add_corpus_args, corpus_documents
from olmo_mini.data.shards import verify_shards, write_shards
from olmo_mini.data.tokenizer import default_tokenizer, eos_id, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_corpus_args(parser)
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json or HF tokenizer folder "
        "(default: the cached stdlib BPE of --vocab-size)",
    )
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--eos-token", help="EOS token (default: from the tokenizer)")
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--verify",
        metavar="SHARDS",
        help="check the shards of a directory or "
        "URL against their manifest's digests instead of writing any",
    )
    parser.add_argument("--procs", type=int, help="tokenizer processes (default: all cores)")
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=1 << 28,
        help="roll over to a new shard after this many tokens",
    )
    args = parser.parse_args()
    if args.verify:
        problems = verify_shards(args.verify)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(1 if problems else 0)
    if args.output is None:
        parser.error("--output is required (unless --verify)")
    path = args.tokenizer or default_tokenizer(args.vocab_size, None, args.val_fraction)
    tokenizer = load_tokenizer(path)
    documents, source = corpus_documents(args)
    start = time.perf_counter()
    manifest = write_shards(
        documents,
        tokenizer,
        eos_id(tokenizer, args.eos_token, path),
        args.output,
        source,
        args.val_fraction,
        args.procs,
        args.shard_tokens,
    )
    seconds = time.perf_counter() - start
    total = sum(manifest["num_tokens"].values())
    print(
        f"{source}: {manifest['num_docs']} docs, {manifest['num_tokens']} tokens "
        f"({manifest['dtype']}) in {len(manifest['shards'])} shards → {args.output} "
        f"[{total / seconds / 1e6:.2f}M tokens/s]"
    )


if __name__ == "__main__":
    main()
