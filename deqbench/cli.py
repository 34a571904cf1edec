"""The `deqbench` console command.

    deqbench reproduce --scenario TINY --budget smoke --data cifar10-jpeg.tar

Exit status:
    0    training completed, whatever the verdict
    1    training failed (divergence, or solvers that stopped converging), and the result file gives the reason.
         Also used when a log, checkpoint, plot or result file could not be written, with the OS error printed.
    2    invalid options or missing data; nothing was trained
    130  stopped by SIGINT, 143 stopped by SIGTERM; a checkpoint was written, so rerun with --resume
This module is the only part of deqbench that prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from deqbench.train.reproduce import PreparedRun, ReproduceReport
    from deqbench.train.settings import TrainOutcome

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

MEASURE_COMMANDS = {
    "memory": "memory of one training step, IFT against unrolled backprop, per forward limit (deqbench memory --help)",
    "bench": "solver speed on the TINY cell, deqbench against torchdeq 0.1.0 (deqbench bench --help)",
}


def _positive(text: str) -> int:
    return _integer(text, 1)


def _non_negative(text: str) -> int:
    return _integer(text, 0)


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is invalid; expected an integer >= {minimum}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" only where the help text does not state the default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, True, []):
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of `deqbench` and its subcommands."""
    parser = argparse.ArgumentParser(prog="deqbench", description="Reference harness for Multiscale Deep Equilibrium Models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    reproduce = commands.add_parser(
        "reproduce",
        help="train a CIFAR-10 scenario and compare its accuracy with the published one",
        description=(
            "Train an MDEQ scenario on CIFAR-10 and write results/reproduce_cifar/<scenario>-<budget>.json "
            "with the accuracy, the verdict against the published number, timings and solver statistics. "
            "Only the full budget on the official CIFAR-10 archive can give the verdict reproduced or "
            "not_reproduced; every other run is not_comparable. Distributed runs: start it with torchrun."
        ),
        formatter_class=_HelpFormatter,
    )
    training = reproduce.add_argument_group("what to train")
    training.add_argument("--scenario", type=str.upper, choices=("TINY", "LARGE", "LARGE_REG"), default="TINY",
                      help="MDEQ configuration and its published accuracy")
    training.add_argument("--variant", choices=("code", "jr_paper"), default="code",
                      help="hyperparameters of the public code, or of the Jacobian-regularization paper's table (LARGE_REG only)")
    training.add_argument("--budget", choices=("full", "smoke"), default="full",
                      help="full: the published schedule on all images; smoke: a check of 8 to 15 minutes on two "
                      "CPU cores (1 epoch, 3,000 training and 1,000 test images, batch 32, 90%% of the steps in warm-up)")
    training.add_argument("--seed", type=_non_negative, default=None, metavar="N",
                      help="seed of weights, data order and dropout (default: the scenario's, 42)")

    data = reproduce.add_argument_group("data")
    data.add_argument("--data", metavar="PATH", default=None,
                      help="tar or directory with train/<class>/ and test/<class>/ images (default: torchvision's "
                      "official CIFAR-10 under --data-root, downloaded when missing)")
    data.add_argument("--data-root", metavar="DIR", default="./data", help="folder of the official CIFAR-10 archive")
    data.add_argument("--no-download", dest="download", action="store_false",
                      help="fail instead of downloading the official archive when it is missing (default: download)")
    data.add_argument("--cache-dir", metavar="DIR", default=None,
                      help="folder a --data tar is extracted into once (default: $DEQBENCH_CACHE or ~/.cache/deqbench)")
    data.add_argument("--workers", type=_non_negative, default=None, metavar="N",
                      help="DataLoader worker processes per training process (default: 0 on the CPU, whose cores "
                      "the training uses, 4 on CUDA)")

    overrides = reproduce.add_argument_group("overrides (any of them makes the budget 'custom')")
    overrides.add_argument("--epochs", type=_positive, default=None, metavar="N",
                           help="training epochs (default: the scenario's, 50 for TINY and 220 for LARGE; 1 for smoke)")
    overrides.add_argument("--train-subset", type=_positive, default=None, metavar="N",
                           help="train on N class-balanced training images (default: all, or 3,000 for smoke)")
    overrides.add_argument("--test-subset", type=_positive, default=None, metavar="N",
                           help="evaluate on N class-balanced test images (default: all, or 1,000 for smoke)")
    overrides.add_argument("--batch-size", type=_positive, default=None, metavar="N",
                           help="images per optimizer step, summed over all processes (default: the scenario's, "
                           "128 for TINY and LARGE and 96 for LARGE_REG; 32 for smoke)")
    overrides.add_argument("--warmup-iterations", type=_non_negative, default=None, metavar="STEPS",
                           help="optimizer steps with the unrolled cell before the implicit layer (default: the "
                           "published count scaled to the run's length)")
    overrides.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                           help="override a scenario value by its dotted key with a JSON value, e.g. "
                           "--set model.channels=[16,16] --set deq.forward.max_nfe=12; repeatable (default: none)")

    output = reproduce.add_argument_group("output")
    output.add_argument("--output", metavar="DIR", default=None,
                        help="folder for checkpoints/ and log.jsonl (default: runs/<scenario>-<budget>)")
    output.add_argument("--results", metavar="PATH", default=None,
                        help="result JSON; the PNG of training curves goes beside it "
                        "(default: results/reproduce_cifar/<scenario>-<budget>.json)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace an existing result file, and without --resume delete earlier checkpoints in --output "
                        "(default: reject both)")
    output.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --output; the options must match the first run "
                        "(default: start a fresh run)")
    output.add_argument("--no-plot", dest="plot", action="store_false",
                        help="skip the PNG of training curves (default: draw it)")

    run = reproduce.add_argument_group("execution")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto picks CUDA when available")
    run.add_argument("--threads", type=_positive, default=None, metavar="N",
                     help="intra-op CPU threads of torch per process (default: torch's choice, one per core); "
                     "on a CPU shared with other jobs, fewer threads than cores can be much faster")
    run.add_argument("--max-unconverged-steps", type=_non_negative, default=50, metavar="STEPS",
                     help="fail the run after this many consecutive implicit steps in which no sample's forward "
                     "or backward solve ended below --unconverged-residual; 0 disables the check")
    run.add_argument("--unconverged-residual", type=float, default=0.5, metavar="R",
                     help="relative residual ||f(z)-z|| / ||f(z)|| a solve must end below to count as converging "
                     "for --max-unconverged-steps; pass the solver tolerance (1e-3) for the strict test")
    run.add_argument("--measure-steps", type=_positive, default=None, metavar="N",
                     help="time N warm-up and N implicit training steps on one batch, print seconds per step and "
                     "the projected full-run time as JSON, and exit without training or writing results "
                     "(default: train)")
    run.add_argument("--stop-after-steps", type=_positive, default=None, metavar="N",
                     help="for tests: stop as if SIGTERM arrived during optimizer step N, writing a checkpoint "
                     "to resume from (default: run to the end)")
    reproduce.set_defaults(handler=_reproduce)

    # The measurement commands keep their own parser in deqbench.measure.runner;
    # main() hands them their arguments before this parser sees them.
    for name, summary in MEASURE_COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def _error(message: str) -> int:
    print(f"deqbench reproduce: error: {message}", file=sys.stderr)
    return EXIT_USAGE


class RepeatLimiter(logging.Filter):
    """Pass the first ``first`` records of each logger and message template, then one in ``every``.

    The implicit layer warns on every training step whose backward solve
    misses its tolerance, which early in training is every step.
    """

    def __init__(self, first: int = 3, every: int = 100) -> None:
        super().__init__()
        self.first = first
        self.every = every
        self.counts: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        count = self.counts.get(key, 0) + 1
        self.counts[key] = count
        if count <= self.first:
            return True
        if count % self.every == 0:
            record.msg = f"{record.msg} [message seen {count} times; showing 1 in {self.every}]"
            return True
        return False


def _configure_logging() -> None:
    from deqbench.train.distributed import env_world

    rank, _, _ = env_world()
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    root.setLevel(level)
    # A second call in the same process (tests call main() repeatedly) adds no second handler.
    if any(getattr(handler, "deqbench_cli", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.deqbench_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatLimiter())
    root.addHandler(handler)


def _reproduce(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from deqbench.checkpoints import CheckpointError
    from deqbench.data import DataError
    from deqbench.train.progress import TqdmProgress
    from deqbench.train.reproduce import ReproduceRequest, UsageError, execute, prepare

    request = ReproduceRequest(
        scenario=args.scenario,
        variant=args.variant,
        budget=args.budget,
        data=args.data,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        download=args.download,
        seed=args.seed,
        output=args.output,
        results=args.results,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        workers=args.workers,
        max_unconverged_steps=args.max_unconverged_steps,
        unconverged_residual=args.unconverged_residual,
        epochs=args.epochs,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        batch_size=args.batch_size,
        warmup_iterations=args.warmup_iterations,
        settings=tuple(args.settings),
        stop_after_steps=args.stop_after_steps,
        plot=args.plot,
        command=("deqbench", *argv),
    )
    if args.measure_steps is not None and (args.resume or args.stop_after_steps is not None):
        return _error(
            "--measure-steps trains no run, so it cannot be combined with --resume or --stop-after-steps; drop one of them"
        )

    prepared: PreparedRun | None = None
    try:
        prepared = prepare(request, check_paths=args.measure_steps is None)
        _configure_logging()
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        if args.measure_steps is not None:
            return _measure(prepared, args.measure_steps)

        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            report = execute(prepared, TqdmProgress())
    except (UsageError, DataError, CheckpointError) as error:
        return _error(str(error))
    except KeyboardInterrupt:
        # A second Ctrl-C during training, or the first one before training installed its handler.
        print(
            "deqbench reproduce: aborted by Ctrl-C; to continue from the newest checkpoint, if the run wrote one, "
            f"run: {_resume_command(argv, prepared)}",
            file=sys.stderr,
        )
        return EXIT_SIGINT
    except OSError as error:
        # Checkpoints are written atomically, so every one on disk is complete and --resume can use it.
        print(
            f"deqbench reproduce: error: {error}; fix the cause (disk space, permissions), then continue from the "
            f"newest checkpoint, if the run wrote one, with: {_resume_command(argv, prepared)}",
            file=sys.stderr,
        )
        return EXIT_FAILED

    return _report(report, argv)


def _resume_command(argv: Sequence[str], prepared: PreparedRun | None) -> str:
    """Return the command that continues this run: ``argv`` with --resume, and with its paths where they were defaults.

    A new run with default paths may have taken a free name such as
    TINY-smoke-2, which the same command with --resume would not pick.
    """
    # --stop-after-steps counts from the start of each process, so carrying it
    # over would stop the resumed run again.
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--stop-after-steps":
            skip_value = True
        elif not arg.startswith("--stop-after-steps="):
            kept.append(arg)
    argv = kept
    command = ["deqbench", *argv]
    if "--resume" not in argv:
        command.append("--resume")
    if prepared is not None and prepared.request.output is None:
        command += ["--output", str(prepared.output_dir)]
    if prepared is not None and prepared.request.results is None:
        command += ["--results", str(prepared.results_path)]
    return shlex.join(command)


def _exit_status(outcome: TrainOutcome) -> int:
    """Map a run's outcome to the exit status listed in the module docstring."""
    if outcome.status == "interrupted":
        return EXIT_SIGINT if outcome.signal_number == signal.SIGINT else EXIT_SIGTERM
    return EXIT_FAILED if outcome.status == "failed" else EXIT_OK


def _report(report: ReproduceReport, argv: Sequence[str]) -> int:
    """Print the outcome of a run on the main process and return the exit status."""
    from deqbench.train.distributed import env_world

    outcome = report.outcome
    if env_world()[0] != 0:
        return _exit_status(outcome)

    if outcome.status == "interrupted":
        print(f"interrupted after step {outcome.steps}; checkpoint: {outcome.checkpoint}")
        print(f"resume with: {_resume_command(argv, report.prepared)}")
        return _exit_status(outcome)

    result = report.result or {}
    verdict = result.get("verdict", {})
    accuracy = result.get("accuracy", {})
    if outcome.status == "failed":
        print(f"training failed: {verdict.get('reason')}")
        print(f"last good checkpoint: {outcome.checkpoint}")
    else:
        print(
            f"{result['scenario']} ({result['budget']['name']} budget, {result['data']['source']} data): best test accuracy "
            f"{accuracy['best']:.2f}% at epoch {accuracy['best_epoch']}, final {accuracy['final']:.2f}%, "
            f"{result['wall_time_s']:.0f} s"
        )
    print(f"verdict: {verdict.get('status')} ({verdict.get('reason')})")
    print(f"result: {report.results_path}")
    return _exit_status(outcome)


def _measure(prepared: PreparedRun, steps: int) -> int:
    """Time training steps of the prepared scenario on one batch of its data and print the JSON."""
    from torch.utils.data import DataLoader

    from deqbench.train.distributed import DistContext
    from deqbench.train.reproduce import load_data
    from deqbench.train.timing import measure_training

    train, _, data = load_data(prepared, DistContext())
    images, labels = next(iter(DataLoader(train, batch_size=prepared.budget.batch_size, shuffle=False)))
    device = "cuda" if prepared.device_type == "cuda" else "cpu"
    measured = measure_training(
        prepared.scenario, prepared.published, images.to(device), labels.to(device), steps, prepared.scenario.train.seed
    )
    measured["data"] = {"source": data["source"], "path": data["path"]}
    print(json.dumps(measured, indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `deqbench` command with ``argv`` (default: sys.argv[1:]) and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MEASURE_COMMANDS:
        from deqbench.measure.runner import main as measure_main

        return measure_main(argv)

    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, argv)


if __name__ == "__main__":
    sys.exit(main())
