"""Loss, perplexity and bits per byte of a model: on a run's held-out split, or on named files.

    python tools/evaluate.py runs/tiny                                # the run's validation batches
    python tools/evaluate.py runs/tiny/checkpoints/step_100 data.val_batches=16
    python tools/evaluate.py runs/tiny --text held_out.jsonl          # every document, whole
    python tools/evaluate.py hf/tiny --text notes.txt --context 256   # a model folder: --text

SOURCE is a checkpoint or run dir, or a model folder (HF or olmo-mini weights). Without --text, a
run is evaluated on its fixed held-out batches (its data config, seed and world size: loss equals
its val/loss in a 32-true run); KEY=VALUE overrides (data.* only) may change how many and how
they are cut (data.val_batches, data.seq_len, ...), never the corpus, the split or the token ids. With --text,
every document of the files (a .txt file, a .jsonl line, a .parquet row) is scored whole in
windows of --context tokens (default: the length the run trained at; a model folder's
max_seq_len), as lm-eval's loglikelihood_rolling scores it. The tokenizer is always the one the
weights were trained with. Bits per byte = total cross-entropy / (ln 2 × UTF-8 bytes of the
predicted text), comparable across tokenizers. Prints one JSON object that also says which split,
how many documents and tokens, and which context it covered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from olmo_mini.evaluation import eval_config, evaluate, evaluate_text
from olmo_mini.interop import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.val_batches=8")
    parser.add_argument(
        "--text", nargs="+", metavar="FILE", help="evaluate every document of these"
    )
    parser.add_argument("--context", type=int, help="window length with --text")
    parser.add_argument("--text-field", default="text", help="the text of a .jsonl/.parquet record")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.text and args.overrides:
        parser.error("KEY=VALUE overrides select the held-out split; with --text use --context")
    if args.context is not None and not args.text:
        parser.error("--context applies to --text; the held-out split's windows are data.seq_len")
    try:
        loaded = load(args.source)
        if args.text:
            result = evaluate_text(loaded, args.text, args.context, args.text_field, args.device)
        else:
            result = evaluate(loaded, eval_config(loaded, args.overrides), args.device)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
