"""Runs over seeds, as the experiment scripts beside it take and report them: their shared command-line
arguments and the spread across seeds."""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path


def add_run_arguments(
    parser: argparse.ArgumentParser, *, seeds: int, rounds: int, work: str, quick: str
) -> None:
    """--seeds, --rounds, --workers (processes, default min(2, cores)), --work (per-run checkpoints),
    --resume and --quick (``quick``: its help)."""
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--work", type=Path, default=Path(work))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help=quick)


def mean_std(values) -> list:
    """[mean, sample std] of the values that are not None ([None, None] if there are none; std 0 for one)."""
    values = [v for v in values if v is not None]
    if not values:
        return [None, None]
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
