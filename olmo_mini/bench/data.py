"""Data-pipeline throughput on this machine, against the issue's targets and the trainer's appetite.

    python tools/bench_data.py                 # stdlib corpus, default tokenizer, all cores

Measures, on the same documents and cores: ``tokenizers``' own ``encode_batch`` (the yardstick),
``write_shards`` (what ``prepare_data.py`` runs), the shard loader and the streaming loader with
0 and 2 workers, and a CPU forward+backward of the default model (what training consumes).
Targets: shard loader ≥ 20M tokens/s; streaming (2 workers) ≥ 70% and preparation ≥ 80% of
``tokenizers``' batch encoding.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from olmo_mini.bench.harness import markdown_table, parser
from olmo_mini.data import DataConfig, OLMoDataModule, padded_vocab_size
from olmo_mini.data.corpus import stdlib_documents
from olmo_mini.data.shards import write_shards
from olmo_mini.data.tokenizer import default_tokenizer, eos_id, load_tokenizer
from olmo_mini.model import OLMo2, OLMo2Config


@dataclass
class DataRow:
    """One pipeline's rate, and the yardstick's measured just before it on the same cores."""

    name: str
    tokens_per_s: float
    yardstick: float

    @property
    def ratio(self) -> float:
        return self.tokens_per_s / self.yardstick


def prepare_rate(
    documents: list[tuple[str, str]], tokenizer: Tokenizer, eos: int, out: Path, procs: int, n: int
) -> float:
    """Tokens/s of ``write_shards`` (what ``prepare_data.py`` runs) on ``procs`` processes."""
    start = time.perf_counter()
    # 2% held out: the loader needs a val split
    write_shards(documents, tokenizer, eos, out, "bench", 0.02, procs)
    return n / (time.perf_counter() - start)


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
    model = OLMo2(OLMo2Config(vocab_size=padded_vocab_size(vocab_size)))
    ids = torch.randint(0, vocab_size, (micro, seq_len))
    model(ids).float().logsumexp(-1).mean().backward()
    start = time.perf_counter()
    for _ in range(steps):
        model(ids).float().logsumexp(-1).mean().backward()
    return steps * ids.numel() / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """``tools/bench_data.py``: a markdown table, whether each target is met, optionally JSON."""
    cli = parser(__doc__)
    cli.add_argument("--max-docs", type=int, default=800, help="stdlib files to use")
    cli.add_argument("--vocab-size", type=int, default=4096)
    cli.add_argument("--seconds", type=float, default=3.0, help="per loader measurement")
    cli.add_argument("--seq-len", type=int, default=256)
    cli.add_argument("--micro-batch-size", type=int, default=8)
    cli.add_argument("--json", type=Path, help="also write the numbers here")
    args = cli.parse_args(argv)
    procs = os.cpu_count() or 1

    path = default_tokenizer(args.vocab_size, None, 0.02)
    tokenizer = load_tokenizer(path)
    eos = eos_id(tokenizer, path=path)
    documents = list(stdlib_documents(args.max_docs))
    texts = [t for _, t in documents]

    def encoded_tokens() -> int:
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return sum(len(e.ids) + 1 for e in encodings)  # + each document's EOS

    def yardstick() -> float:
        """``tokenizers``' own batch encoding of the same texts on all cores, re-measured before
        each pipeline so that load from other processes hits both sides of a ratio alike."""
        start = time.perf_counter()
        return encoded_tokens() / (time.perf_counter() - start)

    rows: dict[str, DataRow] = {}

    def measure(name: str, rate: Callable[..., float], *args: object) -> None:
        base = yardstick()
        rows[name] = DataRow(name, rate(*args), base)

    n = encoded_tokens()
    with tempfile.TemporaryDirectory() as tmp:
        for p in sorted({1, procs}):
            out = Path(tmp) / f"shards{p}"
            measure(f"prepare_data ({p} procs)", prepare_rate, documents, tokenizer, eos, out, p, n)
        files = [str(Path(tmp) / f"docs{i}.jsonl") for i in range(4)]
        for i, file in enumerate(files):  # several files so streaming workers get whole files
            Path(file).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i::4]))
        micro = args.micro_batch_size
        common = dict(seq_len=args.seq_len, micro_batch_size=micro, global_batch_size=4 * micro)
        shards = dict(source="shards", shards=f"{tmp}/shards{procs}")
        hf_stream = dict(source="hf_stream", hf_path="json", hf_data_files=files, val_fraction=0.0)
        hf_stream.update(tokenizer=str(path), hf_val_split="train")
        for kind, source in (("shard", shards), ("streaming", hf_stream)):
            for workers in (0, 2):
                config = DataConfig(num_workers=workers, val_batches=1, **source, **common)
                measure(f"{kind} loader ({workers} workers)", loader_rate, config, args.seconds)
    shape = (tokenizer.get_vocab_size(), args.micro_batch_size, args.seq_len)
    measure("training fwd+bwd (tiny model, CPU)", training_rate, *shape)

    print(
        f"{len(texts)} stdlib files, {n / 1e6:.1f}M tokens, {procs} cores, "
        f"micro batch {args.micro_batch_size} × seq {args.seq_len}\n"
    )
    header = ["measurement", "tokens/s", "tokenizers encode_batch just before", "ratio"]
    cells = [
        (r.name, f"{r.tokens_per_s:,.0f}", f"{r.yardstick:,.0f}", f"{r.ratio:.1%}")
        for r in rows.values()
    ]
    print(markdown_table(header, cells, numeric=3))
    shard_best = max(rows[f"shard loader ({w} workers)"].tokens_per_s for w in (0, 2))
    stream, prep = rows["streaming loader (2 workers)"], rows[f"prepare_data ({procs} procs)"]
    met = {True: "met", False: "NOT met"}
    print(
        f"\ntargets: shard loader ≥ 20M tokens/s: {met[shard_best >= 20e6]}; "
        f"streaming (2 workers) ≥ 70%: {met[stream.ratio >= 0.7]}; "
        f"prepare_data ≥ 80%: {met[prep.ratio >= 0.8]}"
    )
    if args.json:
        record = {
            r.name: {"tokens_per_s": r.tokens_per_s, "yardstick": r.yardstick}
            for r in rows.values()
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0
