"""Command-line pieces shared by ``tools/train_tokenizer.py`` and ``tools/prepare_data.py``."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from olmo_mini.data.corpus import expand_files, file_documents, stdlib_documents
from olmo_mini.data.streaming import HFSource, hf_documents


def add_corpus_args(parser: argparse.ArgumentParser) -> None:
    """Corpus selection shared with ``prepare_data.py``: files, a HF dataset, or the stdlib."""
    parser.add_argument(
        "--input",
        nargs="*",
        default=[],
        help="local .txt/.jsonl/.parquet files or globs (default: the stdlib)",
    )
    parser.add_argument("--hf-path", help="HF dataset name or builder (json/parquet/text)")
    parser.add_argument("--hf-name", help="HF dataset config name")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--hf-data-files", nargs="*", default=[])
    parser.add_argument("--text-field", default="text", help="jsonl/parquet/HF text column")
    parser.add_argument("--max-docs", type=int, help="use only the first N documents")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="held-out fraction by document hash (as the data config)",
    )


def corpus_documents(args: argparse.Namespace) -> tuple[Iterator[tuple[str, str]], str]:
    """``(split_key, text)`` documents named by the arguments, and a description of the source."""
    if args.hf_path:
        source = HFSource(args.hf_path, args.hf_name, args.hf_data_files, args.text_field)
        return hf_documents(source, args.hf_split, args.max_docs), source.describe(args.hf_split)
    if args.input:
        paths = expand_files(args.input)
        return file_documents(paths, args.text_field, args.max_docs), " ".join(map(str, paths))
    return stdlib_documents(args.max_docs), "python stdlib"
