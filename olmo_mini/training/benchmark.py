"""Training-step throughput: olmo-mini against transformers' ``Olmo2ForCausalLM``, side by side.

Both models are built in one process from the same config and the same initial weights and
train on the same batch with the same AdamW flags. Their steps are timed interleaved
(A, B, A, B, ...) so that load from other processes hits both alike; medians and best steps
are reported.

A *mode* is precision x ``torch.compile``. olmo-mini's step is what its trainer runs:
``model(ids, labels=..., z_loss=...)`` (the chunked LM-head loss), compiled as the trainer
compiles it (the whole model, in place); ``+full-ce`` swaps in the plain full-logits loss to
show what the chunked one gains. With ``trainer_steps`` the trainer itself (Lightning loop,
data, logging) runs too, each of its steps followed by one model-level step in the same mode,
for the trainer-over-model ratio. ``tools/bench_train.py`` is the CLI.

MFU = tokens/s x FLOPs per token / peak FLOP/s, with the peak being the dense bf16 datasheet
figure on a GPU and a measured bf16 matmul rate on a CPU, for every row (fp32 rows included),
so that the rows are comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch import nn

from olmo_mini.kernels.linear_cross_entropy import linear_cross_entropy_reference
from olmo_mini.model import OLMo2, OLMo2Config
from olmo_mini.model import hf as hf_keys
from olmo_mini.training.perf import (
    datasheet_bf16_peak,
    flops_per_token,
    measure_matmul_flops,
    peak_flops,
)

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``step(input_ids, labels) -> loss``: forward, loss, backward, optimizer step; no host sync."""


@dataclasses.dataclass(frozen=True)
class TrainMode:
    """How a training step runs: ``precision`` ``fp32`` or ``bf16`` (autocast), compiled or not,
    and (olmo-mini only) ``full_logits_loss``: the plain loss over full fp32 logits instead of
    the model's chunked one (a comparison point, not what the trainer runs)."""

    precision: str = "fp32"
    compile: bool = False
    full_logits_loss: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"TrainMode.precision must be 'fp32' or 'bf16', got {self.precision!r}")

    @property
    def name(self) -> str:
        parts = [self.precision, "compile" if self.compile else "eager"]
        return "+".join(parts + (["full-ce"] if self.full_logits_loss else []))

    @classmethod
    def parse(cls, name: str) -> TrainMode:
        """The inverse of :attr:`name`, e.g. ``bf16+compile`` or ``fp32+eager+full-ce``."""
        parts = name.split("+")
        unknown = set(parts[1:]) - {"compile", "eager", "full-ce"}
        if unknown:
            raise ValueError(f"unknown mode parts {sorted(unknown)} in {name!r}")
        return cls(parts[0], "compile" in parts, "full-ce" in parts)


PLAIN = TrainMode()
FASTEST = TrainMode("bf16", compile=True)
"""The fastest mode of both frameworks on a 2-core AMX Xeon (and the usual one on GPUs)."""


@dataclasses.dataclass(frozen=True)
class BenchSize:
    """Model and batch shape. Defaults are issue 8's target; :data:`TOY` is for tests."""

    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    mlp_hidden_size: int = 1408
    vocab_size: int = 32000
    seq_len: int = 512
    batch_size: int = 4

    def model_config(self) -> OLMo2Config:
        return OLMo2Config(
            vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
            n_heads=self.n_heads, mlp_hidden_size=self.mlp_hidden_size, max_seq_len=self.seq_len,
        )


TOY = BenchSize(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=160, vocab_size=4096,
                seq_len=32, batch_size=2)
"""Vocabulary 4096: the default corpus's tokenizer, so that the trainer row can run too."""


def autocast(device: torch.device, mode: TrainMode) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.precision == "bf16")


def build_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """The same AdamW for both models: the fused (single-kernel) implementation."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """Clip to global norm 1 (as olmo-mini's trainer and transformers' ``Trainer`` do), step,
    drop the gradients: the same for both frameworks."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_logits_loss(model: OLMo2, input_ids: torch.Tensor, labels: torch.Tensor,
                     z_loss: float) -> torch.Tensor:
    """CE + z-loss over the full fp32 logits: the plain path the chunked loss replaces."""
    hidden = model.hidden_states(input_ids)
    return linear_cross_entropy_reference(
        hidden, model.lm_head.weight, labels, z_loss, model.config.final_logit_softcap
    ).loss


def build_train_step(
    model: OLMo2, mode: TrainMode, optimizer: torch.optim.Optimizer, z_loss: float = 1e-4
) -> StepFn:
    """olmo-mini's training step in ``mode`` as its trainer runs it: autocast, the model's
    loss (``model.compile()`` in place first, as ``model.compile=true`` does on one device),
    backward, clipping, AdamW step."""
    device = model.embed_tokens.weight.device
    if mode.compile:
        model.compile()

    def step(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(device, mode):
            if mode.full_logits_loss:
                loss = full_logits_loss(model, input_ids, labels, z_loss)
            else:
                loss = model(input_ids, labels=labels, z_loss=z_loss).loss
        loss.backward()
        optimizer_step(optimizer)
        return loss.detach()

    return step


def build_hf_train_step(model: nn.Module, mode: TrainMode, optimizer: torch.optim.Optimizer) -> StepFn:
    """transformers' step as a user would write it: ``model(ids, labels=...).loss`` (its own
    fp32 cross-entropy, no z-loss), SDPA attention; ``torch.compile`` on the whole model."""
    if mode.full_logits_loss:
        raise ValueError("full-ce is an olmo-mini mode: transformers always has its own loss")
    forward = torch.compile(model) if mode.compile else model
    device = next(model.parameters()).device

    def step(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(device, mode):
            loss = forward(input_ids=input_ids, labels=input_ids, shift_labels=labels).loss
        loss.backward()
        optimizer_step(optimizer)
        return loss.detach()

    return step


def hf_model_like(model: OLMo2) -> nn.Module:
    """``Olmo2ForCausalLM`` (SDPA) with ``model``'s config and a copy of its weights."""
    from transformers import Olmo2Config as HFConfig
    from transformers import Olmo2ForCausalLM

    fields = hf_keys.config_to_hf(model.config, torch.float32, None)
    config = HFConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    hf_model = Olmo2ForCausalLM(config).to(model.embed_tokens.weight.device)
    state = {hf_keys.to_hf_key(k): v.clone() for k, v in model.state_dict().items()}
    hf_model.load_state_dict(state, strict=True)
    return hf_model.train()


@dataclasses.dataclass
class Runner:
    """One model in one mode, ready to step."""

    framework: str  # "olmo-mini" | "transformers"
    mode: TrainMode
    step: StepFn
    times: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0
    loss: float = float("nan")

    @property
    def label(self) -> str:
        return f"{self.framework} {self.mode.name}"


def make_runner(framework: str, mode: TrainMode, size: BenchSize, device: torch.device) -> Runner:
    """A fresh model (seed 0 weights, the same for both frameworks) with its optimizer and step."""
    model = OLMo2(size.model_config()).to(device)
    model.init_weights(seed=0)
    if framework == "olmo-mini":
        return Runner(framework, mode, build_train_step(model, mode, build_optimizer(model)))
    hf_model = hf_model_like(model)
    del model
    return Runner(framework, mode, build_hf_train_step(hf_model, mode, build_optimizer(hf_model)))


def make_batch(size: BenchSize, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, size.vocab_size, (size.batch_size, size.seq_len + 1), generator=gen)
    ids = ids.to(device)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Callable[[], int]]:
    """Peak memory a step adds: CUDA allocator peak, or on CPU the sampled peak process RSS
    above its value at the start (every 2 ms; freed-but-cached memory makes this a floor)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = [0]
        yield lambda: result[0]
        torch.cuda.synchronize(device)
        result[0] = torch.cuda.max_memory_allocated(device) - base
        return
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes() - base)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes() - base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    runners: list[Runner], batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
    warmup: int, repeats: int,
) -> None:
    """Warm each runner up (compiles happen here), then time ``repeats`` rounds of one step
    of each in turn. The loss is read (a host sync) only outside the timed region."""
    for runner in runners:
        for _ in range(warmup):
            runner.step(*batch)
        with peak_memory(device) as peak:
            loss = runner.step(*batch)
            _sync(device)
        runner.peak_bytes, runner.loss = peak(), loss.item()
    for _ in range(repeats):
        for runner in runners:
            _sync(device)
            start = time.perf_counter()
            runner.step(*batch)
            _sync(device)
            runner.times.append(time.perf_counter() - start)


def peak_bf16_flops(device: torch.device) -> tuple[float, str]:
    """The MFU denominator and where it came from (on CPU a larger matmul than the trainer's
    start-up measurement: a benchmark can afford the steadier number)."""
    if device.type == "cpu":
        return measure_matmul_flops(torch.bfloat16, n=2048), "measured bf16 2048^3 matmul"
    peak = peak_flops(device, "bf16-mixed")
    if peak is None:
        raise ValueError(f"no bf16 peak known for {_device_name(device)}")
    known = datasheet_bf16_peak(torch.cuda.get_device_name(device)) is not None
    return peak, "datasheet dense bf16" if known else "Lightning's table (may be a sparse figure)"


def trainer_overrides(size: BenchSize, mode: TrainMode, steps: int, peak: float,
                      device: torch.device) -> list[str]:
    """``train.py`` overrides for the benchmark's model, batch, mode and device: one micro-batch
    per step; no validation, sample, checkpoint, stability measurement or wandb inside the timed
    steps (the CSV log stays). The data is the default corpus; the vocabulary is the benchmark's."""
    if mode.full_logits_loss:
        raise ValueError("the trainer always uses the chunked loss: no full-ce mode")
    return [
        f"model.d_model={size.d_model}", f"model.n_layers={size.n_layers}",
        f"model.n_heads={size.n_heads}", f"model.n_kv_heads={size.n_heads}",
        f"model.mlp_hidden_size={size.mlp_hidden_size}", f"model.vocab_size={size.vocab_size}",
        f"model.max_seq_len={size.seq_len}", f"model.compile={str(mode.compile).lower()}",
        f"data.seq_len={size.seq_len}", f"data.global_batch_size={size.batch_size}",
        f"data.micro_batch_size={size.batch_size}",
        f"trainer.precision={'bf16-mixed' if mode.precision == 'bf16' else '32-true'}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps + 1}",
        "trainer.sample_new_tokens=0", "trainer.progress_bar=false", f"trainer.peak_flops={peak}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "checkpoint.every_n_steps=0", "checkpoint.save_final=false", "stability=off",
        "logger=none",
    ]


class InterleavedSteps(L.Callback):
    """Times every trainer step (from the previous step's end: data loading and Lightning's
    loop included) and, after each, one model-level step of ``runner``: the two alternate
    step by step, so that machine noise hits both alike."""

    def __init__(self, runner: Runner, batch: tuple[torch.Tensor, torch.Tensor],
                 device: torch.device) -> None:
        self.runner, self.batch, self.device = runner, batch, device
        self.trainer_times: list[float] = []
        self._resumed: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        _sync(self.device)
        now = time.perf_counter()
        if self._resumed is not None:
            self.trainer_times.append(now - self._resumed)
        start = time.perf_counter()
        self.runner.step(*self.batch)
        _sync(self.device)
        self.runner.times.append(time.perf_counter() - start)
        self._resumed = time.perf_counter()


def measure_trainer(size: BenchSize, mode: TrainMode, steps: int, peak: float,
                    device: torch.device, extra_overrides: list[str] = ()) -> dict:
    """olmo-mini's trainer (``olmo_mini.training.train``, what ``python train.py`` runs) at this
    size and mode for ``steps`` steps, each followed by one model-level step in the same mode.
    The first quarter of both is left out (compilation, warm-up); returns the trainer's row
    and the ratio of median step times, model-level over trainer."""
    from olmo_mini.config import compose_config
    from olmo_mini.training.run import train

    if steps < 4:
        raise ValueError(f"the trainer row needs at least 4 steps, got {steps}")
    overrides = trainer_overrides(size, mode, steps, peak, device) + list(extra_overrides)
    runner = make_runner("olmo-mini", mode, size, device)
    timer = InterleavedSteps(runner, make_batch(size, device), device)
    with tempfile.TemporaryDirectory() as run_dir:
        train(compose_config(overrides), Path(run_dir), callbacks=[timer])
    skip = max(1, steps // 4)
    trainer_s = statistics.median(timer.trainer_times[skip:])
    model_s = statistics.median(runner.times[skip:])
    tokens = size.batch_size * size.seq_len
    row = {"framework": "olmo-mini trainer", "mode": mode.name, "tokens_per_s": tokens / trainer_s,
           "tokens_per_s_best": tokens / min(timer.trainer_times[skip:]),
           "step_s_median": trainer_s, "step_s_all": timer.trainer_times,
           "model_step_s_all": runner.times, "command": "python train.py " + " ".join(overrides)}
    return {"row": row, "trainer_vs_model": model_s / trainer_s}


def run_benchmark(
    size: BenchSize,
    olmo_modes: list[TrainMode],
    hf_modes: list[TrainMode],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 5,
    trainer_steps: int = 0,
    trainer_extra: list[str] = (),
) -> dict:
    """Time every mode of both frameworks interleaved; return the results as a dict. With
    ``trainer_steps``, then also run ``python train.py`` in olmo-mini's fastest mode."""
    runners = [make_runner("olmo-mini", m, size, device) for m in olmo_modes]
    runners += [make_runner("transformers", m, size, device) for m in hf_modes]
    batch = make_batch(size, device)
    peak, peak_source = peak_bf16_flops(device)
    time_interleaved(runners, batch, device, warmup, repeats)
    tokens = size.batch_size * size.seq_len
    flops = flops_per_token(size.model_config(), size.seq_len)
    rows = []
    for r in runners:
        median = statistics.median(r.times)
        tok_s = tokens / median
        rows.append({
            "framework": r.framework, "mode": r.mode.name, "tokens_per_s": tok_s,
            "tokens_per_s_best": tokens / min(r.times), "step_s_median": median,
            "step_s_all": r.times, "mfu": tok_s * flops / peak,
            "peak_step_mem_mib": r.peak_bytes / 2**20, "loss": r.loss,
        })

    trainer = None
    trainable = [x for x in rows if x["framework"] == "olmo-mini"
                 and not TrainMode.parse(x["mode"]).full_logits_loss]
    if trainer_steps and trainable:  # the trainer has no full-ce mode
        fastest_olmo = max(trainable, key=lambda x: x["tokens_per_s"])
        trainer = measure_trainer(size, TrainMode.parse(fastest_olmo["mode"]), trainer_steps,
                                  peak, device, trainer_extra)
        trainer["row"]["mfu"] = trainer["row"]["tokens_per_s"] * flops / peak

    def fastest(framework: str, plain: bool = False) -> dict:
        pool = [x for x in rows if x["framework"] == framework
                and (not plain or x["mode"] == PLAIN.name)]
        return max(pool, key=lambda x: x["tokens_per_s"])

    # Ratios of medians, and of best steps: load from other processes only ever slows a
    # step down, so under bursty load the best step is the steadier estimate.
    ratios = {}
    if any(m == PLAIN for m in olmo_modes) and any(m == PLAIN for m in hf_modes):
        om, theirs = fastest("olmo-mini", True), fastest("transformers", True)
        ratios["fp32_eager"] = om["tokens_per_s"] / theirs["tokens_per_s"]
        ratios["fp32_eager_best"] = om["tokens_per_s_best"] / theirs["tokens_per_s_best"]
    if olmo_modes and hf_modes:
        best_om, best_hf = fastest("olmo-mini"), fastest("transformers")
        ratios["fastest"] = best_om["tokens_per_s"] / best_hf["tokens_per_s"]
        ratios["fastest_modes"] = f"{best_om['mode']} vs {best_hf['mode']}"
        ratios["fastest_best"] = (max(x["tokens_per_s_best"] for x in rows
                                      if x["framework"] == "olmo-mini")
                                  / max(x["tokens_per_s_best"] for x in rows
                                        if x["framework"] == "transformers"))
    if trainer is not None:
        ratios["trainer_vs_model"] = trainer["trainer_vs_model"]
        rows.append(trainer["row"])
    return {
        "size": dataclasses.asdict(size), "device": _device_name(device),
        "threads": torch.get_num_threads(), "load_average": _load_average(),
        "flops_per_token": flops, "peak_flops": peak, "peak_source": peak_source,
        "warmup": warmup, "repeats": repeats, "rows": rows, "ratios": ratios,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return "cpu"


def _load_average() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def format_table(result: dict) -> str:
    """The human-readable report: one row per framework x mode, then the ratios."""
    lines = [
        f"device: {result['device']}, {result['threads']} threads, "
        f"load average {result['load_average']}",
        f"size: {result['size']}",
        f"MFU peak: {result['peak_flops'] / 1e12:.3g} TFLOP/s ({result['peak_source']}); "
        f"{result['flops_per_token'] / 1e6:.1f} MFLOP/token",
        f"{'framework':<17} {'mode':<22} {'tok/s':>9} {'best':>9} {'step s':>8} {'MFU %':>7} "
        f"{'peak MiB':>9} {'loss':>8}",
    ]
    for row in result["rows"]:
        memory, loss = row.get("peak_step_mem_mib"), row.get("loss")
        lines.append(
            f"{row['framework']:<17} {row['mode']:<22} {row['tokens_per_s']:>9.1f} "
            f"{row['tokens_per_s_best']:>9.1f} {row['step_s_median']:>8.3f} {100 * row['mfu']:>7.2f} "
            f"{'-' if memory is None else f'{memory:.0f}':>9} {'-' if loss is None else f'{loss:.4f}':>8}"
        )
    for key, value in result["ratios"].items():
        lines.append(f"ratio {key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    for row in result["rows"]:
        if "command" in row:
            lines.append(f"trainer command: {row['command']}")
    return "\n".join(lines)


def report(result: dict) -> str:
    """Table, then one JSON line (the machine-readable record)."""
    return format_table(result) + "\n" + json.dumps(result)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default = BenchSize()
    parser = argparse.ArgumentParser(description="olmo-mini vs transformers Olmo2 training steps")
    for field in dataclasses.fields(BenchSize):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int,
                            default=getattr(default, field.name))
    parser.add_argument("--toy", action="store_true", help="tiny shape (tests); overrides sizes")
    parser.add_argument("--olmo-modes", nargs="*", default=[PLAIN.name, FASTEST.name],
                        help="olmo-mini modes, e.g. fp32+eager bf16+compile fp32+eager+full-ce")
    parser.add_argument("--hf-modes", nargs="*", default=[PLAIN.name, FASTEST.name],
                        help="transformers modes, e.g. fp32+eager bf16+compile")
    parser.add_argument("--trainer-steps", type=int, default=0,
                        help="also run olmo-mini's trainer this many steps in its fastest mode, "
                             "interleaved with model-level steps (0: skip; the first quarter is "
                             "left out as warm-up)")
    parser.add_argument("--trainer-overrides", nargs="*", default=[],
                        help="extra train.py overrides for that run, e.g. stability=default")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if 0 < args.trainer_steps < 4:
        raise SystemExit(f"--trainer-steps must be 0 or at least 4, got {args.trainer_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = TOY if args.toy else BenchSize(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSize)}
    )
    result = run_benchmark(
        size, [TrainMode.parse(m) for m in args.olmo_modes],
        [TrainMode.parse(m) for m in args.hf_modes], torch.device(args.device),
        args.warmup, args.repeats, args.trainer_steps, args.trainer_overrides,
    )
    print(report(result), flush=True)
    return 0
