"""Train a byte-level BPE tokenizer (``tokenizers``) and save ``tokenizer.json``.

    python tools/train_tokenizer.py --output tok/ --vocab-size 4096              # the stdlib
    python tools/train_tokenizer.py --input 'data/*.jsonl' --output tok/ --vocab-size 32000
    python tools/train_tokenizer.py --hf-path HuggingFaceFW/fineweb-edu --hf-name sample-10BT \\
        --max-docs 200000 --output tok/

Documents the data pipeline would hold out for validation (``--val-fraction``, same hash) are
left out, so validation text never shapes the merges. Same corpus + settings → same file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from olmo_mini.data.cli import add_corpus_args, corpus_documents
from olmo_mini.data.corpus import is_val
from olmo_mini.data.tokenizer import train_bpe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_corpus_args(parser)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help="a folder (tokenizer.json goes inside) or a .json path",
    )
    args = parser.parse_args()
    documents, source = corpus_documents(args)
    texts = (text for key, text in documents if not is_val(key, args.val_fraction))
    tokenizer = train_bpe(texts, args.vocab_size)
    output = args.output if args.output.suffix == ".json" else args.output / "tokenizer.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output))
    print(f"trained {tokenizer.get_vocab_size()} tokens on {source} → {output}")


if __name__ == "__main__":
    main()
