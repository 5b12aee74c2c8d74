"""Loss, perplexity and bits per byte of a model on held-out data.

    python tools/evaluate.py runs/tiny                                # the run's validation batches
    python tools/evaluate.py runs/tiny/checkpoints/step_100 data.val_batches=16
    python tools/evaluate.py runs/tiny data.source=files 'data.files=[held_out.jsonl]'
    python tools/evaluate.py hf/OLMo-2-0425-1B data.seq_len=1024      # a model folder: defaults

SOURCE is a checkpoint or run dir (its data config, seed and world size pick the same fixed
held-out batches the trainer validated on, so loss equals its val/loss in a 32-true run) or a
model folder (default data, its own tokenizer). key=value overrides change the config. Bits per
byte = total cross-entropy / (ln 2 × UTF-8 bytes of the predicted text), comparable across
tokenizers. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from olmo_mini.interop import eval_config, evaluate, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.val_batches=8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        loaded = load(args.source)
        result = evaluate(loaded.model, eval_config(loaded, args.overrides), args.device)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
