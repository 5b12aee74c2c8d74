"""Throughput of training with and without the stability monitor, measured side by side.

    python tools/bench_stability.py                      # olmo2_tiny, default batch, 40 steps
    python tools/bench_stability.py model=olmo2_small trainer.accelerator=gpu --steps 60
"""

import argparse
import json
import os
import platform

from olmo_mini.stability.bench import measure_overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="train.py overrides (key=value)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    result = measure_overhead(args.overrides, args.steps, args.warmup, args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| monitor | steps/s | tokens/s |\n|---|---:|---:|")
    for name, rate in (("off", result.steps_per_s_off), ("on", result.steps_per_s_on)):
        print(f"| {name} | {rate:.3f} | {rate * result.tokens_per_step:,.0f} |")
    print(f"overhead at stability.every_n_steps={result.every_n_steps}: {100 * result.overhead:.1f}%")
    print(json.dumps({"steps_per_s_off": result.steps_per_s_off,
                      "steps_per_s_on": result.steps_per_s_on, "overhead": result.overhead}))


if __name__ == "__main__":
    main()
