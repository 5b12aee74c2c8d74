"""One command that validates the GPU paths and prints every number a maintainer needs, in one
markdown file: ``tools/gpu_check.py``, the first thing to run on a machine with a GPU. Each part
runs in its own process with a time limit; exit code 1 if any part fails, or without CUDA (one
line). The parts and what each checks: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from olmo_mini.bench.trace import Job
from olmo_mini.config import compose_config
from olmo_mini.model import OLMo2Config
from olmo_mini.sizing.memory import plan_memory

REPO = Path(__file__).resolve().parents[2]
NO_GPU = (
    "error: no CUDA GPU is visible; tools/gpu_check.py validates the GPU paths and needs one "
    "(on CPU, run pytest: the gpu tier skips)"
)
# The ahead-of-time compile check of every Triton kernel launch (olmo_mini/kernels/aot.py).
AOT_TESTS = "tests/kernels/test_aot_compile.py"
# tools/bench_train.py sizes: configs/model/olmo2_{small,1b}.yaml's shapes, a batch of each.
BATCH_SIZES = {"olmo2_small": 8, "olmo2_1b": 4}
SEQ_LEN = 2048
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size")
BENCH_TRAIN_ARGS = (
    "--olmo-modes bf16+eager bf16+compile --hf-modes bf16+eager --warmup 2 --repeats 3"
).split()
BENCH_NORM_ARGS = "--m 16384 --d 2048 4096 --providers triton torch compile".split()
# One step of olmo2_1b on this GPU (tools/bench_memory.py) and the job traced at 8 ranks.
MEMORY_OVERRIDES = (
    "model=olmo2_1b trainer.precision=bf16-mixed data.micro_batch_size=4 data.seq_len=2048 "
    "data.global_batch_size=4"
).split()
TRACE_OVERRIDES = Job("olmo2_1b", 8, 4, 4096, activation_checkpointing=False).overrides()
# Not yet calibrated on a GPU (none was available when this was written). The GPU parts run in
# sequence: at most 565 s; the trace (CPU only, about a minute on 2 loaded cores) runs beside.
LIMITS_S = {
    "tests": 170,
    "syncs": 45,
    "aot": 75,
    "bench_norm": 45,
    "train_olmo2_small": 45,
    "train_olmo2_1b": 110,
    "memory": 75,
    "trace": 300,
}


@dataclass
class Part:
    """One part's outcome: ``ok`` None when it did not run (its test file is not there)."""

    ok: bool | None
    seconds: float
    output: str


def _command(name: str, out: Path) -> list[str] | None:
    python = sys.executable
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    commands = {
        "tests": [*pytest, "-m", "gpu", "tests/gpu", f"--junitxml={out / 'tests.xml'}"],
        "syncs": [*pytest, "tests/training", "-k", "sync", f"--junitxml={out / 'syncs.xml'}"],
        "aot": [*pytest, AOT_TESTS, f"--junitxml={out / 'aot.xml'}"],
        "bench_norm": [python, "tools/bench_norm.py", "--out-dir", str(out / "norm")]
        + BENCH_NORM_ARGS,
        "memory": [python, "tools/bench_memory.py", "--stop-after", "step", *MEMORY_OVERRIDES],
        "trace": [python, "tools/plan_memory.py", "--trace", "--json", *TRACE_OVERRIDES],
    }
    for model, batch_size in BATCH_SIZES.items():
        config = OLMo2Config.from_yaml(REPO / "configs" / "model" / f"{model}.yaml")
        sizes = [
            a for f in SHAPE_FIELDS for a in (f"--{f.replace('_', '-')}", str(getattr(config, f)))
        ]
        sizes += ["--seq-len", str(SEQ_LEN), "--batch-size", str(batch_size)]
        commands[f"train_{model}"] = [python, "tools/bench_train.py", *sizes, *BENCH_TRAIN_ARGS]
    if name == "aot" and not (REPO / AOT_TESTS).is_file():
        return None
    return commands[name]


@dataclass
class Running:
    """A started part: its process (None when it does not run), start time and log file."""

    process: subprocess.Popen | None
    start: float
    log: Path


def _start(name: str, out: Path) -> Running:
    command, log = _command(name, out), out / f"{name}.log"
    if command is None:
        return Running(None, time.perf_counter(), log)
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    return Running(process, time.perf_counter(), log)


def _finish(name: str, running: Running) -> Part:
    """Wait for a part within its limit (from its start); its output is ``<out>/<name>.log``."""
    if running.process is None:
        print(f"{name}: not run ({AOT_TESTS} is not in this checkout)", flush=True)
        return Part(None, 0.0, "")
    left = LIMITS_S[name] - (time.perf_counter() - running.start)
    try:
        ok = running.process.wait(timeout=max(1.0, left)) == 0
    except subprocess.TimeoutExpired:
        running.process.kill()
        running.process.wait()
        with open(running.log, "a") as f:
            f.write(f"\ntimed out after {LIMITS_S[name]} s\n")
        ok = False
    seconds = time.perf_counter() - running.start
    print(f"{name}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
    return Part(ok, seconds, running.log.read_text())


def run_parts(out: Path) -> dict[str, Part]:
    """Every part; the trace beside the test tier (it needs no GPU)."""
    trace = _start("trace", out)
    parts = {"tests": _finish("tests", _start("tests", out))}
    parts["trace"] = _finish("trace", trace)
    for name in ("syncs", "aot", "bench_norm", *(f"train_{m}" for m in BATCH_SIZES), "memory"):
        parts[name] = _finish(name, _start(name, out))
    return parts


def junit_rows(junit: Path) -> list[tuple[str, str]]:
    """``(test id, outcome)`` from pytest's JUnit XML."""
    if not junit.is_file():
        return []
    outcomes = {"failure": "FAILED", "error": "FAILED", "skipped": "skipped"}
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        found = [outcomes[child.tag] for child in case if child.tag in outcomes]
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        rows.append((name, found[-1] if found else "passed"))
    return rows


def norm_rows(csv_file: Path) -> list[dict[str, str]]:
    if not csv_file.is_file():
        return []
    with open(csv_file) as f:
        return list(csv.DictReader(f))


def json_records(output: str) -> list[dict]:
    """The JSON lines of a tool's output."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def _section(title: str, header: str, rows: list[str], note: str = "") -> list[str]:
    """A markdown table under ``## title``, or one "(no results)" row in it."""
    columns = header.count("|") - 1
    empty = "| (no results) |" + " |" * (columns - 1)
    lines = ["", f"## {title}", ""] + ([note, ""] if note else [])
    return lines + [header, "|---" * columns + "|", *(rows or [empty])]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _norm_table(norms: list[dict[str, str]]) -> list[str]:
    """One row per op, pass and shape: Triton's GB/s beside torch.compile's and eager torch's."""
    by_key: dict[tuple[str, ...], dict[str, dict[str, str]]] = {}
    for r in norms:
        by_key.setdefault((r["op"], r["pass_"], r["m"], r["d"]), {})[r["provider"]] = r
    rows = []
    for (op, pass_, m, d), providers in by_key.items():
        triton, compiled = providers.get("triton"), providers.get("compile")
        torch_row = providers.get("torch")

        def rate(r: dict[str, str] | None) -> str:
            return "-" if r is None else f"{float(r['gbps']):.0f}"

        ratio = "-"
        if triton and compiled and float(compiled["gbps"]):
            ratio = f"{float(triton['gbps']) / float(compiled['gbps']):.2f}"
        clone = "-" if triton is None else f"{float(triton['pct_clone']):.0f}"
        rows.append(
            f"| {op} | {pass_} | {m} | {d} | {rate(triton)} | {rate(compiled)} | "
            f"{rate(torch_row)} | {ratio} | {clone} |"
        )
    return rows


def summary(
    device: str,
    parts: dict[str, Part],
    tests: dict[str, list[tuple[str, str]]],
    norms: list[dict[str, str]],
    train: dict[str, list[dict]],
    memory: dict | None,
    memory_plan: dict | None,
    trace: dict | None,
) -> str:
    """The markdown report. ``tests``: JUnit rows per test part; ``train``: bench_train rows
    per model; ``memory``: bench_memory's JSON row and ``memory_plan`` the planner's figures
    for it; ``trace``: ``plan_memory --trace --json``'s object."""

    def status(part: Part) -> str:
        return "not run" if part.ok is None else "ok" if part.ok else "FAILED"

    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    lines = [f"# GPU check: {device}", "", versions]
    lines += _section(
        "Parts",
        "| part | outcome | seconds |",
        [f"| {n} | {status(p)} | {p.seconds:.0f} |" for n, p in parts.items()],
    )
    titles = {
        "tests": "gpu test tier",
        "syncs": "host syncs (tests/training -k sync): steps free of host syncs",
        "aot": f"Triton kernels compiled ahead of time for sm_80 / sm_90 ({AOT_TESTS})",
    }
    for name, title in titles.items():
        if name == "aot" and parts.get(name) and parts[name].ok is None:
            lines += ["", f"## {title}", "", f"not run: {AOT_TESTS} is not in this checkout"]
            continue
        rows = [f"| {test} | {outcome} |" for test, outcome in tests.get(name, [])]
        lines += _section(title, "| test | outcome |", rows)
    lines += _section(
        "Triton norm kernels (bf16) against torch.compile",
        "| op | pass | M | D | Triton GB/s | compile GB/s | eager GB/s | Triton / compile "
        "| Triton % of clone |",
        _norm_table(norms),
    )
    for model, rows in train.items():
        lines += _section(
            f"Training step, {model} shape ({BATCH_SIZES[model]} x {SEQ_LEN} tokens), one GPU",
            "| framework | mode | tokens/s | MFU | peak step MiB |",
            [
                f"| {r['framework']} | {r['mode']} | {r['tokens_per_s']:.0f} | "
                f"{100 * r['mfu']:.1f}% | "
                f"{'-' if r.get('peak_step_mem_mib') is None else round(r['peak_step_mem_mib'])} |"
                for r in rows
            ],
        )
    memory_rows = []
    if memory is not None and memory_plan is not None:
        peak, planned = memory["peak_bytes"], memory_plan["total"]
        memory_rows.append(
            f"| one step on this GPU ({' '.join(MEMORY_OVERRIDES)}), max_memory_allocated | "
            f"{_gib(peak)} | {_gib(planned)} | {100 * (planned - peak) / peak:+.0f} % |"
        )
    if trace is not None:
        traced, plan = trace["trace"], trace["plan"]
        memory_rows.append(
            f"| olmo2_1b traced on 8 fake ranks, 4 x 4096 tokens, rank 0's peak | "
            f"{_gib(traced['peak'])} | {_gib(plan['total'])} | "
            f"{100 * (plan['total'] - traced['peak']) / traced['peak']:+.0f} % |"
        )
    lines += _section(
        "Peak memory against the planner (olmo_mini/sizing/memory.py)",
        "| what | measured GiB | planned GiB | plan vs measured |",
        memory_rows,
        "The one-GPU step is the first (AdamW's state is created after the backward), so its "
        "peak is expected at or below the plan, which holds gradients and AdamW state throughout.",
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate the GPU paths in under 10 minutes.")
    parser.add_argument("--out-dir", type=Path, default=Path("gpu_check_out"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 1
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts = run_parts(out)
    tests = {name: junit_rows(out / f"{name}.xml") for name in ("tests", "syncs", "aot")}
    train = {}
    for model in BATCH_SIZES:
        records = json_records(parts[f"train_{model}"].output)
        train[model] = records[-1].get("rows", []) if records else []
    memory = next(iter(json_records(parts["memory"].output)), None)
    memory_plan = None if memory is None else asdict(plan_memory(compose_config(MEMORY_OVERRIDES)))
    trace = next(iter(json_records(parts["trace"].output)), None)
    norms = norm_rows(out / "norm" / "norm_bench.csv")
    report = summary(
        torch.cuda.get_device_name(), parts, tests, norms, train, memory, memory_plan, trace
    )
    (out / "gpu_check.md").write_text(report)
    print(f"wrote {out / 'gpu_check.md'}")
    return 0 if all(p.ok is not False for p in parts.values()) else 1
