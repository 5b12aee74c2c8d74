"""Data-pipeline throughput on this machine, against the issue's targets and the trainer's appetite.

    python tools/bench_data.py                 # stdlib corpus, default tokenizer, all cores

Measures, on the same documents and cores: ``tokenizers``' own ``encode_batch`` (the yardstick),
``write_shards`` (what ``prepare_data.py`` runs), the shard loader and the streaming loader with
0 and 2 workers, and a CPU forward+backward of the default model (what training consumes).
Targets: shard loader ≥ 20M tokens/s; streaming (2 workers) ≥ 70% and preparation ≥ 80% of
``tokenizers``' batch encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from olmo_mini.data import DataConfig, OLMoDataModule, padded_vocab_size  # noqa: E402
from olmo_mini.data.corpus import is_val, stdlib_documents  # noqa: E402
from olmo_mini.data.shards import write_shards  # noqa: E402
from olmo_mini.data.tokenizer import default_tokenizer, eos_id, load_tokenizer  # noqa: E402


def loader_rate(config: DataConfig, seconds: float) -> float:
    """Input tokens/s of the train loader, after its first batch (worker start-up excluded)."""
    dm = OLMoDataModule(config, seed=0, rank=0, world_size=1)
    dm.setup()
    batches = iter(dm.train_dataloader())
    next(batches)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(batches)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def training_rate(vocab_size: int, micro: int, seq_len: int, steps: int = 3) -> float:
    """Tokens/s of forward+backward of the default (tiny) model on CPU: what training consumes."""
    from olmo_mini.model import OLMo2, OLMo2Config

    model = OLMo2(OLMo2Config(vocab_size=padded_vocab_size(vocab_size)))
    ids = torch.randint(0, vocab_size, (micro, seq_len))
    model(ids).float().logsumexp(-1).mean().backward()
    start = time.perf_counter()
    for _ in range(steps):
        model(ids).float().logsumexp(-1).mean().backward()
    return steps * ids.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-docs", type=int, default=800, help="stdlib files to use")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=3.0, help="per loader measurement")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    procs = os.cpu_count() or 1

    path = default_tokenizer(args.vocab_size, None, 0.02)
    tokenizer = load_tokenizer(path)
    eos = eos_id(tokenizer, path=path)
    documents = [(k, t) for k, t in stdlib_documents(args.max_docs) if not is_val(k, 0.02)]
    texts = [t for _, t in documents]
    results: dict[str, tuple[float, float]] = {}  # name → (tokens/s, yardstick measured just before)

    def yardstick() -> float:
        """``tokenizers``' own batch encoding of the same texts on all cores, re-measured before
        each pipeline so that load from other processes hits both sides of a ratio alike."""
        start = time.perf_counter()
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return sum(len(e.ids) + 1 for e in encodings) / (time.perf_counter() - start)

    n = sum(len(e.ids) + 1 for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False))
    with tempfile.TemporaryDirectory() as tmp:
        for p in sorted({1, procs}):
            base = yardstick()
            start = time.perf_counter()
            write_shards(documents, tokenizer, eos, Path(tmp) / f"shards{p}", "bench", 0.0, p)
            results[f"prepare_data ({p} procs)"] = (n / (time.perf_counter() - start), base)
        shards = str(Path(tmp) / f"shards{procs}")
        files = []
        for i in range(4):  # several files so streaming workers get whole files
            files.append(str(Path(tmp) / f"docs{i}.jsonl"))
            with open(files[-1], "w") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts[i::4])
        common = dict(seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                      global_batch_size=args.micro_batch_size * 4, val_batches=1)
        for workers in (0, 2):
            config = DataConfig(source="shards", shards=shards, num_workers=workers, **common)
            results[f"shard loader ({workers} workers)"] = (
                loader_rate(config, args.seconds), yardstick())
        for workers in (0, 2):
            config = DataConfig(source="hf_stream", hf_path="json", hf_data_files=files,
                                tokenizer=str(path), num_workers=workers, val_fraction=0.0,
                                hf_val_split="train", **common)
            base = yardstick()
            results[f"streaming loader ({workers} workers)"] = (
                loader_rate(config, args.seconds), base)
    results["training fwd+bwd (tiny model, CPU)"] = (
        training_rate(tokenizer.get_vocab_size(), args.micro_batch_size, args.seq_len),
        yardstick())

    print(f"{len(texts)} stdlib files, {n / 1e6:.1f}M tokens, {procs} cores, "
          f"micro batch {args.micro_batch_size} × seq {args.seq_len}\n")
    print("| measurement | tokens/s | tokenizers encode_batch just before | ratio |")
    print("|---|---:|---:|---:|")
    for name, (rate, base) in results.items():
        print(f"| {name} | {rate:,.0f} | {base:,.0f} | {rate / base:.1%} |")
    shard_best = max(results[f"shard loader ({w} workers)"][0] for w in (0, 2))
    stream, stream_base = results["streaming loader (2 workers)"]
    prep, prep_base = results[f"prepare_data ({procs} procs)"]
    print(f"\ntargets: shard loader ≥ 20M tokens/s: {'met' if shard_best >= 20e6 else 'NOT met'}; "
          f"streaming (2 workers) ≥ 70%: {'met' if stream >= 0.7 * stream_base else 'NOT met'}; "
          f"prepare_data ≥ 80%: {'met' if prep >= 0.8 * prep_base else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({k: {"tokens_per_s": r, "yardstick": b}
                                          for k, (r, b) in results.items()}, indent=2))


if __name__ == "__main__":
    main()
