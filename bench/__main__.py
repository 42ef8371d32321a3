"""``python -m bench``: run a benchmark suite on the present device, print a table, write results.

Examples::

    python -m bench                          # linear suite, GPU if present else CPU
    python -m bench --suite conv             # ResNet-50 conv layers: SparseConv2d vs nn.Conv2d and masked
    python -m bench --suite layout           # layout build and set_masks cost against training steps
    python -m bench --quick --out /tmp/b     # tiny config (seconds), e.g. for tests
    python -m bench --device cuda --tune     # GPU: autotune, store configs, then benchmark

Results go to ``bench/results/<suite>_<device>_<date>.{csv,json,md}`` unless
``--out`` says otherwise; progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

from bench import common

SUITES = ("linear", "conv", "layout")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=SUITES, default="linear", help="which suite to run (default: linear)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny configuration, for tests (linear: 256x256, 64 tokens; conv: 32->32 3x3 on 8x8; layout: 512x512)",
    )
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="results folder (default: bench/results)")
    p.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: per device)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warmup steps (default: per device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument(
        "--tune",
        action="store_true",
        help="GPU only, linear suite: autotune the kernels for the suite's shapes and merge the chosen configs "
        "into kernels/tuned/<device>.json before benchmarking",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    if args.tune and device.type != "cuda":
        print("--tune needs a CUDA device: there is nothing to tune on the CPU", file=sys.stderr)
        return 2
    if args.tune and args.suite != "linear":
        print("--tune belongs to the linear suite (it tunes the kernels for its shapes)", file=sys.stderr)
        return 2
    dtype = common.parse_dtype(args.dtype) if args.dtype else None
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    # A suite module has default_config(device, dtype, quick), run(cfg, device, env), tables(rows),
    # headline(rows) and optionally describe(cfg), the header's configuration sentence.
    suite = importlib.import_module(f"bench.{args.suite}")
    cfg = suite.default_config(device, dtype, quick=args.quick)
    if args.repeats is not None:
        cfg.repeats = args.repeats
    if args.warmup is not None:
        cfg.warmup = args.warmup
    env = common.environment(device)
    if env["interpret"]:
        common.progress("warning: SPARSEKERN_INTERPRET/TRITON_INTERPRET is set: CPU timings are the interpreter's")

    if args.tune:
        written = suite.write_tuned(suite.tune(cfg, device))
        for line in written:
            common.progress(f"tuned configs written: {line}")

    rows = suite.run(cfg, device, env)
    text = f"## {args.suite}: {env['device']}\n\n"
    if hasattr(suite, "describe"):
        text += suite.describe(cfg)
    else:
        text += f"shape {cfg.shape} (tokens x out x in), {common.dtype_name(cfg.dtype)}, "
        text += f"{cfg.warmup} warmup + {cfg.repeats} timed steps"
    text += f"; torch {env['torch']}, triton {env['triton']}, "
    text += f"git {env['git_sha']}, {env['date']}, load average {env['loadavg_1min']} "
    text += f"on {os.cpu_count()} cores"
    if env["omp_wait_policy"]:
        text += f", OMP_WAIT_POLICY={env['omp_wait_policy']}"
    text += "\n\n"
    text += suite.tables(rows)
    line = suite.headline(rows)
    if line:
        text += "\n\n" + line
    if device.type != "cuda":
        text += "\n\nGPU numbers are absent: "
        text += (
            "this machine has no CUDA device."
            if not torch.cuda.is_available()
            else "this run was on the CPU (--device cpu)."
        )
        if args.suite == "linear":
            text += " Run `make bench-gpu` on a GPU machine for them."
        else:
            text += f" Run `python -m bench --suite {args.suite} --device cuda` on a GPU machine for them."
    print(text, flush=True)

    paths = common.write_results(rows, env, args.out, common.result_stem(args.suite, env), text)
    for kind, path in paths.items():
        common.progress(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
