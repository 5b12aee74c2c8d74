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

import dataclasses
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from olmo_mini.bench.harness import (
    device_name,
    json_line,
    load_average,
    parser,
    peak_bytes,
    quiet_run,
    reset_peak,
    time_trainer,
    timed,
)
from olmo_mini.config import compose_config
from olmo_mini.kernels.linear_cross_entropy import linear_cross_entropy_reference
from olmo_mini.model import OLMo2, OLMo2Config
from olmo_mini.model import hf as hf_keys
from olmo_mini.sizing.flops import datasheet_bf16_peak, flops_per_token, measure_matmul_flops
from olmo_mini.training.run import peak_flops

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(input_ids, labels) -> loss``: a loss, or a whole training step (forward, loss, backward,
optimizer step; no host sync)."""


@dataclasses.dataclass(frozen=True)
class TrainMode:
    """How a training step runs: ``precision`` ``fp32`` or ``bf16`` (autocast), compiled or not,
    and (olmo-mini only, ``full-ce``) the plain loss over full fp32 logits."""

    precision: str = "fp32"
    compile: bool = False
    full_logits_loss: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"a mode's precision must be 'fp32' or 'bf16', got {self.precision!r}")

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

    def model_fields(self) -> dict[str, int]:
        """The model's config fields at this size: plain multi-head attention."""
        shape = dataclasses.asdict(self)
        del shape["batch_size"], shape["seq_len"]
        return {**shape, "max_seq_len": self.seq_len, "n_kv_heads": self.n_heads}

    def model_config(self) -> OLMo2Config:
        return OLMo2Config(**self.model_fields())


TOY = BenchSize(
    64, n_layers=2, n_heads=4, mlp_hidden_size=160, vocab_size=4096, seq_len=32, batch_size=2
)
"""Vocabulary 4096: the default corpus's tokenizer, so that the trainer row can run too."""


def train_step(
    loss: StepFn, device: torch.device, mode: TrainMode, optimizer: torch.optim.Optimizer
) -> StepFn:
    """``loss`` under autocast, backward, then clipping to global norm 1 (as olmo-mini's trainer
    and transformers' ``Trainer`` do), the AdamW step and dropped gradients: the same for both
    frameworks."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, torch.bfloat16, enabled=mode.precision == "bf16"):
            value = loss(input_ids, labels)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.detach()

    return step


def olmo_loss(model: OLMo2, mode: TrainMode, z_loss: float = 1e-4) -> StepFn:
    """olmo-mini's loss as its trainer runs it (``model.compile()`` in place first, as
    ``model.compile=true`` does on one device), or with ``full-ce`` the plain path it replaces."""
    if mode.compile:
        model.compile()
    if not mode.full_logits_loss:
        return lambda input_ids, labels: model(input_ids, labels=labels, z_loss=z_loss).loss

    def full_logits_loss(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = model.hidden_states(input_ids)
        weight, softcap = model.lm_head.weight, model.config.final_logit_softcap
        return linear_cross_entropy_reference(hidden, weight, labels, z_loss, softcap).loss

    return full_logits_loss


def hf_loss(model: nn.Module, mode: TrainMode) -> StepFn:
    """transformers' loss as a user would write it: ``model(ids, labels=...).loss`` (its own
    fp32 cross-entropy, no z-loss), SDPA attention; ``torch.compile`` on the whole model."""
    if mode.full_logits_loss:
        raise ValueError("full-ce is an olmo-mini mode: transformers always has its own loss")
    forward = torch.compile(model) if mode.compile else model
    return lambda ids, labels: forward(input_ids=ids, labels=ids, shift_labels=labels).loss


def hf_model_like(model: OLMo2) -> nn.Module:
    """``Olmo2ForCausalLM`` (SDPA) with ``model``'s config and a copy of its weights."""
    from transformers import Olmo2Config as HFConfig
    from transformers import Olmo2ForCausalLM

    fields = hf_keys.config_to_hf(model.config, torch.float32, None)
    del fields["architectures"], fields["model_type"]
    config = HFConfig(**fields, attn_implementation="sdpa")
    hf_model = Olmo2ForCausalLM(config).to(model.embed_tokens.weight.device)
    state = {hf_keys.to_hf_key(k): v.clone() for k, v in model.state_dict().items()}
    hf_model.load_state_dict(state, strict=True)
    return hf_model.train()


@dataclasses.dataclass
class Runner:
    """One model in one mode, ready to step, and what its steps measured."""

    framework: str  # "olmo-mini" | "transformers"
    mode: TrainMode
    step: StepFn
    times: list[float] = dataclasses.field(default_factory=list)
    peak_step_bytes: int = 0
    loss: float = float("nan")


def make_runner(framework: str, mode: TrainMode, size: BenchSize, device: torch.device) -> Runner:
    """A fresh model (seed 0 weights, the same for both frameworks) with its fused AdamW and step."""
    model = OLMo2(size.model_config()).to(device)
    model.init_weights(seed=0)
    if framework == "olmo-mini":
        loss = olmo_loss(model, mode)
    else:
        model = hf_model_like(model)
        loss = hf_loss(model, mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    return Runner(framework, mode, train_step(loss, device, mode, optimizer))


def make_batch(size: BenchSize, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, size.vocab_size, (size.batch_size, size.seq_len + 1), generator=gen)
    ids = ids.to(device)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def time_interleaved(
    runners: list[Runner],
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> None:
    """Warm each runner up (compiles happen here) and measure one step's peak memory and loss,
    then time ``repeats`` rounds of one step of each in turn. The loss is read (a host sync)
    only outside the timed region."""
    for runner in runners:
        for _ in range(warmup):
            runner.step(*batch)
        base = reset_peak(device)
        loss = runner.step(*batch)
        runner.peak_step_bytes, runner.loss = peak_bytes(device) - base, loss.item()
    for _ in range(repeats):
        for runner in runners:
            runner.times.append(timed(lambda r=runner: r.step(*batch), device))


def peak_bf16_flops(device: torch.device) -> tuple[float, str]:
    """The MFU denominator and where it came from (on CPU a larger matmul than the trainer's
    start-up measurement: a benchmark can afford the steadier number)."""
    if device.type == "cpu":
        return measure_matmul_flops(torch.bfloat16, n=2048), "measured bf16 2048^3 matmul"
    peak = peak_flops(device, "bf16-mixed")
    if peak is None:
        raise ValueError(f"no bf16 peak known for {device_name(device)}")
    known = datasheet_bf16_peak(torch.cuda.get_device_name(device)) is not None
    return peak, "datasheet dense bf16" if known else "Lightning's table (may be a sparse figure)"


@dataclasses.dataclass
class TrainRow:
    """One framework x mode. Model-level rows carry the peak memory and loss of one step; the
    trainer's row the model-level steps interleaved with it and the command it ran."""

    framework: str
    mode: str
    tokens_per_s: float
    tokens_per_s_best: float
    step_s_median: float
    step_s_all: list[float]
    mfu: float
    peak_step_mem_mib: float | None = None
    loss: float | None = None
    model_step_s_all: list[float] | None = None
    command: str | None = None


@dataclasses.dataclass
class TrainResult:
    """The whole run: ``tools/bench_train.py``'s table and its last line, as JSON."""

    size: BenchSize
    device: str
    flops_per_token: float
    peak_flops: float
    peak_source: str
    warmup: int
    repeats: int
    rows: list[TrainRow]
    ratios: dict[str, float | str]
    threads: int = dataclasses.field(default_factory=torch.get_num_threads)
    load_average: list[float] | None = dataclasses.field(default_factory=load_average)


def measure_trainer(
    size: BenchSize,
    mode: TrainMode,
    steps: int,
    peak: float,
    device: torch.device,
    extra_overrides: Sequence[str] = (),
) -> tuple[list[float], Runner, str]:
    """The trainer row of the module docstring: ``steps`` steps of one micro-batch in a quiet run
    without stability measurement, on the default corpus. Returns the trainer's step times, the
    model-level runner and the trainer's command."""
    if steps < 4:
        raise ValueError(f"the trainer row needs at least 4 steps, got {steps}")
    overrides = [
        *(f"model.{key}={value}" for key, value in size.model_fields().items()),
        f"model.compile={str(mode.compile).lower()}",
        f"data.seq_len={size.seq_len}",
        f"data.global_batch_size={size.batch_size}",
        f"data.micro_batch_size={size.batch_size}",
        f"trainer.precision={'bf16-mixed' if mode.precision == 'bf16' else '32-true'}",
        f"trainer.peak_flops={peak}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "stability=off",
        *quiet_run(steps, extra_overrides),
        *extra_overrides,
    ]
    runner, batch = make_runner("olmo-mini", mode, size, device), make_batch(size, device)

    def between() -> None:
        runner.times.append(timed(lambda: runner.step(*batch), device))

    seconds = time_trainer(compose_config(overrides), between)
    return seconds, runner, "python train.py " + " ".join(overrides)


def ratios(rows: list[TrainRow]) -> dict[str, float | str]:
    """olmo-mini over transformers: in fp32 eager and fastest mode against fastest, as ratios of
    medians and of best steps (load from other processes only ever slows a step down, so under
    bursty load the best step is the steadier estimate)."""
    out: dict[str, float | str] = {}
    for name, plain in (("fp32_eager", True), ("fastest", False)):
        pools = [
            [r for r in rows if r.framework == framework and (not plain or r.mode == PLAIN.name)]
            for framework in ("olmo-mini", "transformers")
        ]
        if not all(pools):
            continue
        om, hf = (max(pool, key=lambda r: r.tokens_per_s) for pool in pools)
        out[name] = om.tokens_per_s / hf.tokens_per_s
        if not plain:
            out["fastest_modes"] = f"{om.mode} vs {hf.mode}"
        om_best, hf_best = (max(r.tokens_per_s_best for r in pool) for pool in pools)
        out[f"{name}_best"] = om_best / hf_best
    return out


def run_benchmark(
    size: BenchSize,
    olmo_modes: list[TrainMode],
    hf_modes: list[TrainMode],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 5,
    trainer_steps: int = 0,
    trainer_extra: Sequence[str] = (),
) -> TrainResult:
    """Time every mode of both frameworks interleaved. With ``trainer_steps``, then also run
    ``python train.py`` in olmo-mini's fastest mode; its first quarter of steps (compilation,
    warm-up) is left out of its row and its ratio to the model-level steps."""
    runners = [make_runner("olmo-mini", m, size, device) for m in olmo_modes]
    runners += [make_runner("transformers", m, size, device) for m in hf_modes]
    peak, peak_source = peak_bf16_flops(device)
    time_interleaved(runners, make_batch(size, device), device, warmup, repeats)
    tokens = size.batch_size * size.seq_len
    flops = flops_per_token(size.model_config(), size.seq_len)

    def row(
        framework: str, mode: TrainMode, times: list[float], skip: int = 0, **extra: object
    ) -> TrainRow:
        median = statistics.median(times[skip:])
        rate, best = tokens / median, tokens / min(times[skip:])
        return TrainRow(
            framework, mode.name, rate, best, median, times, rate * flops / peak, **extra
        )

    rows = [
        row(r.framework, r.mode, r.times, peak_step_mem_mib=r.peak_step_bytes / 2**20, loss=r.loss)
        for r in runners
    ]
    result = TrainResult(
        size, device_name(device), flops, peak, peak_source, warmup, repeats, rows, ratios(rows)
    )
    olmo = zip(rows, olmo_modes, strict=False)  # olmo-mini's rows come first
    trainable = {m: r.tokens_per_s for r, m in olmo if not m.full_logits_loss}
    if trainer_steps and trainable:  # the trainer has no full-ce mode
        mode = max(trainable, key=trainable.__getitem__)
        seconds, model, command = measure_trainer(
            size, mode, trainer_steps, peak, device, trainer_extra
        )
        skip = max(1, trainer_steps // 4)
        trainer = row(
            "olmo-mini trainer", mode, seconds, skip, model_step_s_all=model.times, command=command
        )
        model_s = statistics.median(model.times[skip:])
        result.ratios["trainer_vs_model"] = model_s / trainer.step_s_median
        rows.append(trainer)
    return result


def format_table(result: TrainResult) -> str:
    """The human-readable report: one row per framework x mode, then the ratios."""
    lines = [
        f"device: {result.device}, {result.threads} threads, load average {result.load_average}",
        f"size: {dataclasses.asdict(result.size)}",
        f"MFU peak: {result.peak_flops / 1e12:.3g} TFLOP/s ({result.peak_source}); "
        f"{result.flops_per_token / 1e6:.1f} MFLOP/token",
        f"{'framework':<17} {'mode':<22} {'tok/s':>9} {'best':>9} {'step s':>8} {'MFU %':>7} "
        f"{'peak MiB':>9} {'loss':>8}",
    ]
    for r in result.rows:
        memory = "-" if r.peak_step_mem_mib is None else f"{r.peak_step_mem_mib:.0f}"
        loss = "-" if r.loss is None else f"{r.loss:.4f}"
        lines.append(
            f"{r.framework:<17} {r.mode:<22} {r.tokens_per_s:>9.1f} {r.tokens_per_s_best:>9.1f} "
            f"{r.step_s_median:>8.3f} {100 * r.mfu:>7.2f} {memory:>9} {loss:>8}"
        )
    for key, value in result.ratios.items():
        lines.append(f"ratio {key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    lines += [f"trainer command: {r.command}" for r in result.rows if r.command]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``tools/bench_train.py``: the table, then one JSON line (the machine-readable record)."""
    cli = parser("olmo-mini vs transformers Olmo2 training steps")
    sizes = dataclasses.asdict(BenchSize())
    for name, default in sizes.items():
        cli.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    cli.add_argument("--toy", action="store_true", help="tiny shape (tests); overrides sizes")
    modes = [PLAIN.name, FASTEST.name]
    cli.add_argument("--olmo-modes", nargs="*", default=modes, help="e.g. fp32+eager+full-ce")
    cli.add_argument("--hf-modes", nargs="*", default=modes, help="e.g. fp32+eager bf16+compile")
    cli.add_argument(
        "--trainer-steps",
        type=int,
        default=0,
        help="also run olmo-mini's trainer this many steps in its fastest mode, interleaved with "
        "model-level steps (0: skip; the first quarter is left out as warm-up)",
    )
    cli.add_argument("--trainer-overrides", nargs="*", default=[], help="e.g. stability=default")
    cli.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    cli.add_argument("--repeats", type=int, default=5, help="timed steps per mode")
    cli.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    args = cli.parse_args(argv)
    if 0 < args.trainer_steps < 4:
        raise SystemExit(
            f"error: --trainer-steps must be 0 or at least 4, got {args.trainer_steps}"
        )
    try:
        olmo_modes = [TrainMode.parse(m) for m in args.olmo_modes]
        hf_modes = [TrainMode.parse(m) for m in args.hf_modes]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    size = TOY if args.toy else BenchSize(**{name: getattr(args, name) for name in sizes})
    steps = (args.warmup, args.repeats, args.trainer_steps, args.trainer_overrides)
    result = run_benchmark(size, olmo_modes, hf_modes, torch.device(args.device), *steps)
    print(format_table(result) + "\n" + json_line(result), flush=True)
    return 0
