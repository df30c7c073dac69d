"""The ``fedmoe`` command.

    fedmoe run      one experiment from flags and/or a TOML config (flags win)
    fedmoe compare  several strategies x seeds on the same partitions (seed s: same data split,
                    partition, client profiles and initial model for every strategy)
    fedmoe sweep    a grid of option values x seeds (sensitivity): one table and heatmaps

Every option of :class:`fedmoe.federated.FederatedConfig` is a flag (``num_clients`` -> ``--num-clients``;
``--deadline none`` for no deadline; ``--channels 16,32``). ``run`` writes ``OUT/result.json`` (config and
per-round records), ``OUT/accuracy.png``, ``OUT/load_heatmap.png`` and ``OUT/checkpoint.pt`` (after every
round; ``--resume`` continues from it). ``compare`` writes one result and checkpoint per run under
``OUT/runs/``, ``OUT/summary.json`` (per strategy: ``final_accuracy`` and ``rounds_to_target`` lists, one
entry per seed, null where the target was never reached, and more), ``OUT/config.json`` and the plots,
and prints a table. ``sweep`` (``--grid fitness_ema=0.7,0.9 --grid fit_weight/load_weight=0.3/0.7,0.7/0.3``)
writes its runs under ``OUT/runs/``, ``OUT/sweep.json`` (per grid point and metric: one value per seed,
mean, std, min, max), ``OUT/table.txt`` (also printed) and ``OUT/heatmap_<metric>.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedmoe.data import load_dataset
from fedmoe.federated import FederatedConfig
from fedmoe.federated.compare import compare_strategies, format_table, run_to_file, summarize, write_json
from fedmoe.federated.sweep import METRICS, format_sweep, parse_axis, run_sweep
from fedmoe.plots import plot_accuracy, plot_load_heatmap, plot_sweep

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["main"]

DEFAULT_STRATEGIES = "random,greedy,load-balanced,optimal"
_PER_RUN = {"strategy", "seed"}  # set by compare's --strategies / --seeds


def _parse_value(kind: type, text: str):
    if kind is float and text.lower() == "none":  # the only optional option: deadline
        return None
    return kind(text)


def _add_config_options(parser: argparse.ArgumentParser, skip: set[str]) -> None:
    group = parser.add_argument_group("experiment options (default: the TOML config, else built in)")
    defaults = FederatedConfig().to_dict()
    for name, kind in FederatedConfig.option_types().items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        help_ = f"default {defaults[name]}"
        # SUPPRESS: an option not given leaves no attribute, so the TOML value or the default stands
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
        elif name == "channels":
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar="C1,C2,...", help=help_,
                               type=lambda s: tuple(int(c) for c in s.split(",")))
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_,
                               type=lambda s, kind=kind: _parse_value(kind, s), metavar=kind.__name__.upper())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmoe", description="Federated Mixture-of-Experts training "
                                     "with dynamic client-expert alignment.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one experiment", description="Run one federated experiment.",
                         allow_abbrev=False)
    compare = sub.add_parser("compare", help="strategies x seeds", allow_abbrev=False,
                             description="Compare alignment strategies over several seeds.")
    sweep = sub.add_parser("sweep", help="a grid of options x seeds", allow_abbrev=False,
                           description="Sensitivity sweep: run a grid of option values over several seeds.")
    for p, out in ((run, "fedmoe_out/run"), (compare, "fedmoe_out/compare"), (sweep, "fedmoe_out/sweep")):
        p.add_argument("--config", type=Path, help="TOML file of experiment options")
        p.add_argument("--out", type=Path, default=Path(out), help=f"output directory (default {out})")
        p.add_argument("--resume", action="store_true", help="continue from the checkpoint(s) in --out")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    compare.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                         help=f"comma-separated strategy names (default {DEFAULT_STRATEGIES})")
    sweep.add_argument("--grid", action="append", required=True, metavar="NAME=V1,V2,...",
                       help="an axis: one option (fitness_ema=0.7,0.9) or several set together "
                            "(fit_weight/load_weight=0.3/0.7,0.7/0.3); repeat for more axes")
    for p in (compare, sweep):
        p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
        p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                       help="runs in parallel processes (default min(2, CPUs))")
    _add_config_options(run, set())
    _add_config_options(compare, _PER_RUN)
    _add_config_options(sweep, {"seed"})
    return parser


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> FederatedConfig:
    """TOML config (if any) with the given flags on top."""
    options = {}
    if args.config is not None:
        try:
            options = tomllib.loads(args.config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            parser.error(f"--config {args.config}: {exc}")
    for name in FederatedConfig.option_types():
        if hasattr(args, name):
            options[name] = getattr(args, name)
    try:
        config = FederatedConfig.from_dict(options)
    except (TypeError, ValueError) as exc:
        parser.error(f"bad experiment option: {exc}")
    try:  # fail here, with the option named, rather than in every run
        load_dataset(config.data, test_fraction=config.test_fraction, seed=config.seed)
    except (OSError, TypeError, ValueError) as exc:
        parser.error(f"--data {config.data!r}: {exc}")
    return config


def _cmd_run(args, parser) -> None:
    config = _config(args, parser)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    out = args.out
    result = run_to_file(config.to_dict(), str(out / "result.json"), str(out / "checkpoint.pt"), args.resume,
                         args.threads, not args.quiet)
    plot_accuracy({config.strategy: [result]}, out / "accuracy.png", target=config.target_accuracy)
    plot_load_heatmap({config.strategy: result}, out / "load_heatmap.png")
    cv = result["rounds"][-1]["load_cv"] if result["rounds"] else float("nan")
    print(f"{config.strategy}: final accuracy {result['final_accuracy']:.4f}, rounds to "
          f"{config.target_accuracy:g}: {result['rounds_to_target']}, final load CV {cv:.3f}, "
          f"{result['bytes_sent'] / 1e6:.1f} MB sent, {result['wall_seconds']:.1f} s -> {out}")


def _check_parallel(args, parser) -> None:
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be >= 1")


def _cmd_compare(args, parser) -> None:
    base = _config(args, parser)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    _check_parallel(args, parser)
    if not strategies or len(set(strategies)) != len(strategies):
        parser.error(f"--strategies must name distinct strategies, got {args.strategies!r}")
    for s in strategies:
        try:
            base.replace(strategy=s)
        except ValueError as exc:
            parser.error(f"--strategies: {exc}")
    seeds = range(args.seeds)
    results = compare_strategies(base, strategies, seeds, args.out, workers=args.workers,
                                 threads=args.threads, resume=args.resume, progress=not args.quiet)
    summary = summarize(results)
    out = args.out
    write_json(out / "summary.json", summary)
    write_json(out / "config.json", {**base.to_dict(), "strategies": strategies, "seeds": list(seeds)})
    plot_accuracy(results, out / "accuracy.png", target=base.target_accuracy,
                  title=f"Test accuracy per round ({base.data}, band: min-max over {args.seeds} seeds)")
    plot_load_heatmap({s: runs[0] for s, runs in results.items()}, out / "load_heatmap.png",
                      title="Expert load (seed 0)")
    print(format_table(summary, base.target_accuracy))
    print(f"-> {out}/summary.json, accuracy.png, load_heatmap.png")


def _cmd_sweep(args, parser) -> None:
    base = _config(args, parser)
    _check_parallel(args, parser)
    try:
        axes = [parse_axis(text) for text in args.grid]
        summary = run_sweep(base, axes, range(args.seeds), args.out, workers=args.workers,
                            threads=args.threads, resume=args.resume, progress=not args.quiet)
    except (TypeError, ValueError) as exc:
        parser.error(f"--grid: {exc}")
    out = args.out
    write_json(out / "sweep.json", summary)
    table = format_sweep(summary)
    (out / "table.txt").write_text(table + "\n")
    for metric, (label, _) in METRICS.items():
        plot_sweep(summary, metric, out / f"heatmap_{metric}.png", label=label)
    print(table)
    print(f"-> {out}/sweep.json, table.txt, heatmap_<metric>.png")


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    {"run": _cmd_run, "compare": _cmd_compare, "sweep": _cmd_sweep}[args.command](args, parser)


if __name__ == "__main__":
    sys.exit(main())
