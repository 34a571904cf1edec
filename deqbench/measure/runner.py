"""Runner of ``python -m deqbench.measure memory|bench [options]``; ``main(argv)`` is its entry point.

The only part of deqbench.measure that prints. ``memory`` and ``bench``
write JSON records, validated against results/schemas/, and a PNG beside
each. ``memory-point`` measures one point and prints it as one JSON line;
``memory`` starts it in a fresh process for every point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from deqbench.results import REPO_ROOT, atomic_write_json, capture_env, validate

RESULTS = REPO_ROOT / "results"


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 2,4,8; got {text!r}") from error


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-3,1e-5; got {text!r}") from error


def _model_batches(text: str) -> dict[str, int]:
    batches = {}
    for part in text.split(","):
        name, _, batch = part.partition(":")
        if not batch.isdigit() or int(batch) < 1:
            raise argparse.ArgumentTypeError(f"expected MODEL:BATCH pairs such as TINY:8,LARGE:4; got {part!r}")
        batches[name.upper()] = int(batch)
    return batches


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deqbench.measure",
        description="Measure the memory and solver speed of deqbench's implicit MDEQ layers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    memory = commands.add_parser("memory", help="memory of one training step, IFT against unrolled, per forward limit")
    memory.add_argument("--models", type=_model_batches, default={"TINY": 8, "LARGE": 4}, help="MODEL:BATCH pairs (default TINY:8,LARGE:4)")
    memory.add_argument("--limits", type=_int_list, default=[2, 4, 8, 16, 32, 64], help="forward limits in evaluations of f")
    memory.add_argument("--backwards", default="ift,unrolled", help="backward modes, comma-separated (ift, unrolled, phantom)")
    memory.add_argument("--solver", default="broyden", help="forward solver of the IFT points (default broyden)")
    memory.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    memory.add_argument("--threads", type=int, default=1, help="torch intra-op threads per point (default 1; see docs/benchmarks.md)")
    memory.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per point")
    memory.add_argument("--output", type=Path, default=RESULTS / "memory.json", help="JSON record to write")
    memory.add_argument("--plot", type=Path, default=RESULTS / "memory.png", help="PNG to write")

    point = commands.add_parser("memory-point", help="measure one point in this process and print it as JSON")
    point.add_argument("--point", required=True, help="MemoryPoint fields as a JSON object")

    bench = commands.add_parser("bench", help="solver speed on the TINY cell, deqbench against torchdeq")
    bench.add_argument("--batch-size", type=int, default=8, help="images per solve (default 8)")
    bench.add_argument("--max-nfe", type=int, default=60, help="evaluation budget of each solve (default 60)")
    bench.add_argument("--tolerances", type=_float_list, default=[1e-3, 1e-5], help="relative-residual tolerances")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (default 3)")
    bench.add_argument("--rebalance", type=float, default=4.0, help="fusion rebalance factor of tiny_contractive")
    bench.add_argument("--data", type=Path, default=None, help="CIFAR-10 tar or ImageFolder directory (default $DEQBENCH_DATA, then ../shared/data/cifar10-jpeg.tar)")
    bench.add_argument("--checkpoint", type=Path, default=None, help="trainer checkpoint of a TINY model, adds the 'checkpoint' problem")
    bench.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see docs/benchmarks.md)")
    bench.add_argument("--no-torchdeq", action="store_true", help="measure deqbench only")
    bench.add_argument("--output", type=Path, default=RESULTS / "solvers.json", help="JSON record to write")
    bench.add_argument("--plot", type=Path, default=RESULTS / "solvers.png", help="PNG to write")
    return parser


MEMORY_METHOD = {
    "saved_tensor_bytes": "torch.autograd.graph.saved_tensors_hooks around the forward and loss of one training step; "
    "each saved tensor is keyed by its storage's data pointer and every storage counted once at its full size; "
    "storages of parameters and buffers are excluded (saved_parameter_bytes)",
    "peak_rss_bytes": "ru_maxrss after one training step (forward, cross-entropy, backward) in train mode on random "
    "images, measured before the counting step",
    "forward_limit": "forward solve with tolerance 1e-30, stall window above the limit and divergence factor 1e30, so it "
    "uses exactly f_max_iter evaluations; unrolled applies f f_max_iter times with autograd on every step",
    "isolation": "every point runs in a fresh Python process (python -m deqbench.measure memory-point)",
    "baseline_rss_bytes": "resident memory from /proc/self/statm after model and batch construction",
}


def run_memory(args: argparse.Namespace) -> int:
    from deqbench.measure.memory import growth_checks, sweep
    from deqbench.measure.plots import plot_memory

    def show(run: dict[str, Any]) -> None:
        print(
            f"{run['model']:>5} {run['backward']:>8} k={run['f_max_iter']:>3}: saved {run['saved_tensor_bytes'] / 2**20:9.1f} MiB, "
            f"peak RSS {run['peak_rss_bytes'] / 2**20:8.1f} MiB (baseline {run['baseline_rss_bytes'] / 2**20:7.1f}), "
            f"solver state {run['solver_state_bytes'] / 2**20:7.1f} MiB, {run['step_time_s']:6.2f} s",
            flush=True,
        )

    backwards = [b for b in args.backwards.split(",") if b]
    load_start = os.getloadavg()
    runs = sweep(
        args.models,
        args.limits,
        backwards,
        solver=args.solver,
        device=args.device,
        threads=args.threads,
        timeout_s=args.timeout,
        on_run=show,
    )
    data = {
        "env": capture_env(args.device),
        "load_average": [*load_start, *os.getloadavg()],
        "method": MEMORY_METHOD,
        "runs": runs,
        "checks": growth_checks(runs),
    }
    validate(data, "memory")
    atomic_write_json(args.output, data)
    plot_memory(data, args.plot)

    for check in data["checks"]:
        verdict = "PASS" if check["passed"] else "FAIL"
        print(f"{verdict} {check['model']} {check['backward']}: saved bytes x{check['saved_bytes_ratio']:.3f} from k=4 to k=64 ({check['requirement']})")
    print(f"wrote {args.output} and {args.plot}")
    return 0


def run_point(args: argparse.Namespace) -> int:
    import torch

    from deqbench.measure.memory import MemoryPoint, measure_point

    point = MemoryPoint(**json.loads(args.point))
    torch.set_num_threads(point.threads)
    print(json.dumps(measure_point(point)))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from deqbench.measure import baseline
    from deqbench.measure.plots import plot_solvers
    from deqbench.measure.problems import default_data_path, tiny_problems
    from deqbench.measure.speed import benchmark, nfe_comparison

    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    with_torchdeq = not args.no_torchdeq
    if with_torchdeq and not baseline.available():
        print("torchdeq is not installed: run `nox -s bench`, or pass --no-torchdeq", file=sys.stderr)
        return 2

    data_path = args.data if args.data is not None else default_data_path()
    problems = tiny_problems(args.batch_size, data_path, rebalance=args.rebalance, checkpoint=args.checkpoint)

    def show(kind: str, record: dict[str, Any]) -> None:
        if kind == "problems":
            print(f"problem {record['name']}: f {record['f_eval_time_s'] * 1e3:.1f} ms, spectral radius ~{record['contraction_estimate']:.3f}; {record['images']}", flush=True)
        elif kind == "runs":
            print(
                f"  {record['problem']:>16} {record['library']:>8} {record['solver']:>11} tol {record['tolerance']:.0e}: "
                f"nfe {record['nfe']:>3} (to tol {record['nfe_to_tolerance']}), {record['wall_time_s']:.3f} s, "
                f"rel {record['final_rel_residual']:.2e}, overhead x{record['overhead_ratio']:.2f}",
                flush=True,
            )
        elif kind == "train_steps":
            print(
                f"  step {record['library']:>8} {record['solver']:>11} tol {record['tolerance']:.0e}: {record['wall_time_s']:.3f} s, "
                f"nfe {record['forward_nfe']} / {record['backward_nfe']}",
                flush=True,
            )
        else:
            print(f"  gradient {record['solver']:>11} tol {record['tolerance']:.0e}: rel error {record['rel_error']:.2e}, cosine {record['cosine']:.6f}", flush=True)

    report = benchmark(
        problems,
        tolerances=tuple(args.tolerances),
        max_nfe=args.max_nfe,
        repeats=args.repeats,
        with_torchdeq=with_torchdeq,
        on_record=show,
    )
    data = {
        "env": capture_env("cpu"),
        "load_average": [*load_start, *os.getloadavg()],
        **report,
        "checks": nfe_comparison(report, min(args.tolerances)),
    }
    validate(data, "solvers")
    atomic_write_json(args.output, data)
    plot_solvers(data, args.plot)

    for check in data["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "N/A (neither reached)"}[check["passed"]]
        print(f"{verdict} {check['problem']} {check['solver']}: NFE to {check['tolerance']:.0e} deqbench {check['deqbench_nfe']}, torchdeq {check['torchdeq_nfe']}")
    print(f"wrote {args.output} and {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default sys.argv[1:]), run the command and return its exit status."""
    args = build_parser().parse_args(argv)
    handlers = {"memory": run_memory, "memory-point": run_point, "bench": run_bench}
    return handlers[args.command](args)
