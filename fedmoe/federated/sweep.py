"""Sensitivity sweeps: a grid of option values x seeds, run in parallel processes, summarised per grid point.

An axis sets one option or several together, by their paths in the config tree: ``fitness.ema=0.7,0.9``
or ``alignment.desirability.alpha/alignment.desirability.beta=0.3/0.7,0.7/0.3`` (values of the options
joined by ``/``). The grid is
the product of the axes; every point runs with every seed (seed s: same data, partition and profiles at
every point). Per point: final accuracy, mean accuracy over the last 5 rounds, rounds to the target
(None where not reached) and final load CV, each as a list over seeds with mean and sample std.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmoe.federated.compare import RunError, run_configs
from fedmoe.federated.config import FederatedConfig

__all__ = ["METRICS", "Axis", "format_sweep", "parse_axis", "run_sweep"]

# metric -> (label, higher is better)
METRICS = {"final_accuracy": ("final accuracy", True), "last5_accuracy": ("accuracy, last 5 rounds", True),
           "rounds_to_target": ("rounds to target", False), "load_cv": ("final load CV", False)}
_LAST = 5


@dataclass(frozen=True)
class Axis:
    """``names``: the options this axis sets together; ``values``: one tuple (a value per name) per point."""

    names: tuple[str, ...]
    values: tuple[tuple, ...]

    @property
    def label(self) -> str:
        return "/".join(self.names)

    def format(self, value: tuple) -> str:
        return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)


def parse_axis(text: str) -> Axis:
    """``"name=v1,v2"`` or ``"a/b=va1/vb1,va2/vb2"`` -> :class:`Axis` (values typed by the option)."""
    if not isinstance(text, str) or text.count("=") != 1:
        raise ValueError(f"axis must look like name=v1,v2,... or a/b=a1/b1,a2/b2,..., got {text!r}")
    left, right = text.split("=")
    names = tuple(n.strip() for n in left.split("/"))
    options = FederatedConfig.options()
    for name in names:
        if name not in options or name == "federation.seed" or options[name].sequence:
            sweepable = sorted(p for p, o in options.items() if p != "federation.seed" and not o.sequence)
            raise ValueError(f"axis {left!r}: {name!r} is not a sweepable option; options: {sweepable}")
    if len(set(names)) != len(names):
        raise ValueError(f"axis {left!r} names an option twice")
    values = []
    for item in right.split(","):
        parts = item.strip().split("/")
        if len(parts) != len(names):
            raise ValueError(f"axis {left!r}: value {item.strip()!r} must have {len(names)} part(s)")
        try:
            values.append(tuple(options[n].parse(p.strip()) for n, p in zip(names, parts, strict=True)))
        except ValueError as exc:
            raise ValueError(f"axis {left!r}: bad value {item.strip()!r}: {exc}") from None
    if len(set(values)) != len(values):
        raise ValueError(f"axis {left!r} repeats a value")
    return Axis(names, tuple(values))


def _points(axes: Sequence[Axis]) -> list[tuple[tuple, ...]]:
    return list(itertools.product(*(a.values for a in axes)))


def _changes(axes: Sequence[Axis], point: tuple[tuple, ...]) -> dict:
    return {name: v for axis, value in zip(axes, point, strict=True)
            for name, v in zip(axis.names, value, strict=True)}


def _stats(values: list) -> dict:
    known = [v for v in values if v is not None]
    return {"values": values, "mean": statistics.fmean(known) if known else None,
            "std": statistics.stdev(known) if len(known) > 1 else 0.0, "min": min(known, default=None),
            "max": max(known, default=None)}


def run_sweep(base: FederatedConfig, axes: Sequence[Axis], seeds: Sequence[int], out, *, workers: int = 1,
              threads: int = 1, resume: bool = False, progress: bool = True) -> dict:
    """Run every grid point of ``axes`` (over ``base``) with every seed; runs go to ``out/runs`` (see
    :func:`fedmoe.federated.compare.run_configs`). Returns the summary: ``base`` config, ``axes``
    (label, names, formatted values), ``seeds`` and one entry per ``points`` with its ``values`` (axis
    label -> formatted value) and per metric of :data:`METRICS` the per-seed list, mean, std, min and max.
    Every point's config is checked before anything runs (ValueError naming the point); a run that fails on
    a bad input raises :class:`~fedmoe.federated.compare.RunError` naming the run and its grid point."""
    axes, seeds = list(axes), list(seeds)
    if not axes or not all(isinstance(a, Axis) for a in axes):
        raise TypeError("axes must be a non-empty sequence of Axis")
    names = [n for a in axes for n in a.names]
    if len(set(names)) != len(names):
        raise ValueError(f"axes set an option twice: {names}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    points = _points(axes)
    configs, where = {}, {}
    for i, point in enumerate(points):
        try:
            config = base.replace(_changes(axes, point))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"grid point {_changes(axes, point)}: {exc}") from None
        configs.update({f"point{i:03d}-seed{s}": config.replace({"federation.seed": s}) for s in seeds})
        where.update({f"point{i:03d}-seed{s}": f"grid point {_changes(axes, point)}" for s in seeds})
    try:
        results = run_configs(configs, Path(out) / "runs", workers=workers, threads=threads, resume=resume,
                              progress=progress)
    except RunError as exc:
        raise RunError(f"{exc.name} ({where[exc.name]})", exc.error) from exc.__cause__
    summary = {"base": base.to_dict(), "seeds": seeds,
               "axes": [{"label": a.label, "names": list(a.names), "values": [a.format(v) for v in a.values]}
                        for a in axes], "points": []}
    for i, point in enumerate(points):
        runs = [results[f"point{i:03d}-seed{s}"] for s in seeds]
        entry = {"values": {a.label: a.format(v) for a, v in zip(axes, point, strict=True)}}
        entry["final_accuracy"] = _stats([r["final_accuracy"] for r in runs])
        entry["last5_accuracy"] = _stats([statistics.fmean(x["accuracy"] for x in r["rounds"][-_LAST:])
                                          if r["rounds"] else None for r in runs])
        entry["rounds_to_target"] = _stats([r["rounds_to_target"] for r in runs])
        entry["load_cv"] = _stats([r["rounds"][-1]["load_cv"] if r["rounds"] else None for r in runs])
        summary["points"].append(entry)
    return summary


def format_sweep(summary: dict) -> str:
    """A text table of :func:`run_sweep` output, one row per grid point, best mean final accuracy first:
    mean ± std over seeds of each metric and the worst seed's final accuracy; rounds to target is the
    mean over the seeds that reached it, with how many did."""
    labels = [a["label"] for a in summary["axes"]]
    width = [max(len(label), 8) + 2 for label in labels]
    head = "".join(f"{label:<{w}}" for label, w in zip(labels, width, strict=True)) + \
        f"{'final accuracy':>18}{'worst seed':>12}{'last 5':>18}{'rounds to target':>20}{'load CV':>16}"
    lines = [head, "-" * len(head)]
    order = sorted(summary["points"], key=lambda p: -(p["final_accuracy"]["mean"] or 0.0))
    for p in order:
        row = "".join(f"{p['values'][label]:<{w}}" for label, w in zip(labels, width, strict=True))
        rtt = p["rounds_to_target"]
        reached = sum(v is not None for v in rtt["values"])
        rounds = "-" if rtt["mean"] is None else f"{rtt['mean']:.1f} ± {rtt['std']:.1f}"
        rounds += f" ({reached}/{len(rtt['values'])})"
        worst = p["final_accuracy"]["min"]
        worst = "-" if worst is None else f"{worst:.3f}"
        lines.append(row + f"{_pm(p['final_accuracy']):>18}{worst:>12}{_pm(p['last5_accuracy']):>18}"
                     f"{rounds:>20}{_pm(p['load_cv']):>16}")
    return "\n".join(lines)


def _pm(stats: dict) -> str:
    return "-" if stats["mean"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"
