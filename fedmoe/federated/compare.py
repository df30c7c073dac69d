"""Many runs in parallel processes (:func:`run_configs`), and strategies x seeds on the same partitions:
for seed s every strategy gets the same data split, partition, client profiles, initial model and
simulated events (they are all keyed by the seed)."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fedmoe.federated.config import FederatedConfig
from fedmoe.federated.runner import run_experiment

__all__ = ["RunError", "compare_configs", "compare_strategies", "format_table", "run_configs", "run_to_file",
           "summarize", "write_json"]

_INPUT_ERRORS = (OSError, TypeError, ValueError)  # what a run raises for a bad input (data, files, options)


class RunError(Exception):
    """A run of :func:`run_configs` failed on a bad input (the ``__cause__``, a ValueError, TypeError or
    OSError): ``name`` is the run, ``error`` the message of the cause."""

    def __init__(self, name: str, error: str):
        super().__init__(name, error)
        self.name, self.error = name, error

    def __str__(self) -> str:
        return f"run {self.name}: {self.error}"


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def run_to_file(config: dict, path: str, checkpoint: str, resume: bool, threads: int, progress: bool) -> dict:
    """One run from a plain ``config`` dict (picklable, for worker processes), its result JSON written to
    ``path`` and returned; ``threads``: torch intra-op threads of this process."""
    torch.set_num_threads(threads)
    cfg = FederatedConfig.from_dict(config)
    result = run_experiment(cfg, checkpoint=checkpoint, resume=resume, progress=progress,
                            desc=f"{cfg.alignment.strategy} seed {cfg.federation.seed}")
    write_json(path, result)
    return result


def run_configs(configs: Mapping[str, FederatedConfig], runs, *, workers: int = 1, threads: int = 1,
                resume: bool = False, progress: bool = True) -> dict[str, dict]:
    """Run every config of ``configs`` (run name -> config); returns run name -> results JSON.

    Each run writes ``runs/<name>.json`` and a checkpoint ``runs/<name>.pt``. ``workers`` > 1 runs them
    in that many processes (``threads`` torch threads each). With ``resume``, finished runs whose JSON
    holds the same config are kept and unfinished ones continue from their checkpoints. A run that fails on
    a bad input raises :class:`RunError` naming it (runs not yet started are cancelled).
    """
    for name, value in (("workers", workers), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    runs = Path(runs)
    jobs = {name: (config.to_dict(), str(runs / f"{name}.json"), str(runs / f"{name}.pt"))
            for name, config in configs.items()}
    done = {}
    if resume:
        for name, (config, path, _) in jobs.items():
            if Path(path).exists() and (kept := json.loads(Path(path).read_text())).get("config") == config:
                done[name] = kept
    todo = [name for name in jobs if name not in done]
    with tqdm(total=len(jobs), initial=len(done), desc="runs", unit="run", disable=not progress) as bar:
        if workers == 1:
            for name in todo:
                try:
                    done[name] = run_to_file(*jobs[name], resume, threads, progress)
                except _INPUT_ERRORS as exc:
                    raise RunError(name, str(exc)) from exc
                bar.update()
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(run_to_file, *jobs[name], resume, threads, False): name
                           for name in todo}
                for future in as_completed(futures):
                    name = futures[future]
                    try:
                        done[name] = future.result()
                    except _INPUT_ERRORS as exc:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise RunError(name, str(exc)) from exc
                    bar.set_postfix_str(f"{name}: acc {done[name]['final_accuracy']:.3f}")
                    bar.update()
    return {name: done[name] for name in jobs}


def compare_configs(variants: Mapping[str, FederatedConfig], seeds: Sequence[int], out, *, workers: int = 1,
                    threads: int = 1, resume: bool = False, progress: bool = True) -> dict[str, list[dict]]:
    """Run every variant (name -> config; names must be usable in file names) with every seed; results
    JSONs by variant, in ``seeds`` order. Runs are named ``<variant>-seed<s>`` under ``out/runs`` (see
    :func:`run_configs`)."""
    seeds = list(seeds)
    if not variants:
        raise ValueError("variants must not be empty")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    configs = {f"{name}-seed{seed}": config.replace({"federation.seed": seed})
               for name, config in variants.items() for seed in seeds}
    done = run_configs(configs, Path(out) / "runs", workers=workers, threads=threads, resume=resume,
                       progress=progress)
    return {name: [done[f"{name}-seed{seed}"] for seed in seeds] for name in variants}


def compare_strategies(base: FederatedConfig, strategies: Sequence[str], seeds: Sequence[int], out, *,
                       workers: int = 1, threads: int = 1, resume: bool = False,
                       progress: bool = True) -> dict[str, list[dict]]:
    """Run ``base`` with every strategy and seed; results JSONs by strategy, in ``seeds`` order
    (:func:`compare_configs` with one variant per strategy)."""
    strategies = list(strategies)
    if not strategies or len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must be distinct names, got {strategies}")
    return compare_configs({s: base.replace({"alignment.strategy": s}) for s in strategies}, seeds, out,
                           workers=workers, threads=threads, resume=resume, progress=progress)


def summarize(results: dict[str, list[dict]]) -> dict:
    """Per strategy, lists with one entry per seed (``final_accuracy``, ``rounds_to_target`` with None
    where never reached, ``best_accuracy``, ``final_load_cv``, bytes, simulated time) and the mean and
    sample standard deviation of the final accuracy."""
    summary = {}
    for name, runs in results.items():
        final = [r["final_accuracy"] for r in runs]
        known = [a for a in final if a is not None]
        summary[name] = {
            "seeds": [r["config"]["federation"]["seed"] for r in runs],
            "final_accuracy": final,
            "rounds_to_target": [r["rounds_to_target"] for r in runs],
            "best_accuracy": [r["best_accuracy"] for r in runs],
            "final_load_cv": [r["rounds"][-1]["load_cv"] if r["rounds"] else None for r in runs],
            "bytes_sent": [r["bytes_sent"] for r in runs],
            "bytes_received": [r["bytes_received"] for r in runs],
            "sim_time": [r["sim_time"] for r in runs],
            "final_accuracy_mean": statistics.fmean(known) if known else None,
            "final_accuracy_std": statistics.stdev(known) if len(known) > 1 else 0.0,
        }
    return summary


def format_table(summary: dict, target: float) -> str:
    """A text table of :func:`summarize` output: final accuracy mean ± std over seeds, mean rounds to
    ``target`` over the seeds that reached it (and how many did), final load CV, MB sent per run."""
    head = f"{'strategy':<16}{'final accuracy':>20}{f'rounds to {target:g}':>18}{'reached':>9}" \
           f"{'load CV':>9}{'MB sent':>9}"
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        reached = [r for r in s["rounds_to_target"] if r is not None]
        rounds = f"{statistics.fmean(reached):.1f}" if reached else "-"
        acc = "-" if s["final_accuracy_mean"] is None else \
            f"{s['final_accuracy_mean']:.4f} ± {s['final_accuracy_std']:.4f}"
        cv = [c for c in s["final_load_cv"] if c is not None]
        count = f"{len(reached)}/{len(s['rounds_to_target'])}"
        lines.append(f"{name:<16}{acc:>20}{rounds:>18}{count:>9}"
                     f"{statistics.fmean(cv) if cv else float('nan'):>9.3f}"
                     f"{statistics.fmean(s['bytes_sent']) / 1e6:>9.1f}")
    return "\n".join(lines)
