"""Convert between olmo-mini training checkpoints and Hugging Face Olmo2 folders.

    python tools/convert_hf.py to-hf runs/tiny hf/tiny                 # newest checkpoint of a run
    python tools/convert_hf.py to-hf runs/tiny/checkpoints/step_100 hf/tiny --dtype bf16
    python tools/convert_hf.py from-hf allenai/OLMo-2-0425-1B-local olmo2_1b_init

to-hf takes a single-file or sharded (FSDP) checkpoint and writes config.json, safetensors, the
run's tokenizer and generation_config.json: transformers' AutoModelForCausalLM/AutoTokenizer load
it. from-hf checks that an HF Olmo2 folder (from transformers, OLMo-core, ...) converts, writes it
again as to-hf writes folders (fp32 weights, complete config.json, generation_config.json, its
tokenizer files) and prints the train.py overrides that continue pretraining from it
(model.init_from also takes the source folder itself). Only weights cross over: AdamW's moments
start at zero, as HF folders hold no optimizer state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from olmo_mini.interop import export_hf, import_hf, model_overrides

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="training checkpoint or run dir -> HF Olmo2 folder")
    to_hf.add_argument("source", metavar="CHECKPOINT_OR_RUN_DIR")
    to_hf.add_argument("out", type=Path, metavar="OUT")
    to_hf.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights dtype (fp32)")
    from_hf = commands.add_parser("from-hf", help="HF Olmo2 folder -> checked fp32 HF folder")
    from_hf.add_argument("source", metavar="HF_FOLDER")
    from_hf.add_argument("out", type=Path, metavar="OUT")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            out = export_hf(args.source, args.out, DTYPES[args.dtype])
            print(f"wrote {_written(out)}: {args.dtype} weights from {args.source}")
            return 0
        config = import_hf(args.source, args.out)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    overrides = " ".join(model_overrides(config))
    print(f"wrote {_written(args.out)}")
    if (args.out / "tokenizer.json").is_file():
        tokenizer = f" data.tokenizer={args.out}"
    else:  # OLMo-core writes none; a train.py pointing data.tokenizer here would fail
        tokenizer = ""
        print(
            f"{args.source} has no tokenizer files: the command below trains with olmo-mini's "
            "default tokenizer; add data.tokenizer=PATH for the one these weights learned"
        )
    print(
        "continue pretraining from it (optimizer state starts fresh) with\n"
        f"  python train.py {overrides}{tokenizer} model.init_from={args.out}"
    )
    return 0


def _written(folder: Path) -> str:
    """``folder (N MB: file, file, ...)``: what a conversion wrote."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    return f"{folder} ({size / 1e6:.1f} MB: {', '.join(p.name for p in files)})"


if __name__ == "__main__":
    sys.exit(main())
