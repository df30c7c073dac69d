"""Strategies x seeds on the same partitions: for seed s every strategy gets the same data split,
partition, client profiles, initial model and simulated events (they are all keyed by the seed)."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fedmoe.federated.config import FederatedConfig
from fedmoe.federated.runner import run_experiment

__all__ = ["compare_strategies", "format_table", "run_to_file", "summarize", "write_json"]


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run_to_file(config: dict, path: str, checkpoint: str, resume: bool, threads: int, progress: bool) -> dict:
    """One run from a plain ``config`` dict (picklable, for worker processes), its result JSON written to
    ``path`` and returned; ``threads``: torch intra-op threads of this process."""
    torch.set_num_threads(threads)
    cfg = FederatedConfig.from_dict(config)
    result = run_experiment(cfg, checkpoint=checkpoint, resume=resume, progress=progress,
                            desc=f"{cfg.strategy} seed {cfg.seed}")
    write_json(path, result)
    return result


def compare_strategies(base: FederatedConfig, strategies: Sequence[str], seeds: Sequence[int], out, *,
                       workers: int = 1, threads: int = 1, resume: bool = False,
                       progress: bool = True) -> dict[str, list[dict]]:
    """Run ``base`` with every strategy and seed; results JSONs by strategy, in ``seeds`` order.

    Each run writes ``out/runs/<strategy>-seed<s>.json`` and a checkpoint next to it. ``workers`` > 1 runs
    them in that many processes. With ``resume``, finished runs whose JSON holds the same config are
    kept and unfinished ones continue from their checkpoints.
    """
    strategies, seeds = list(strategies), list(seeds)
    if not strategies or len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must be distinct names, got {strategies}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    for name, value in (("workers", workers), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    runs = Path(out) / "runs"
    jobs = {(s, seed): (base.replace(strategy=s, seed=seed).to_dict(), str(runs / f"{s}-seed{seed}.json"),
                        str(runs / f"{s}-seed{seed}.pt")) for s in strategies for seed in seeds}
    done = {}
    if resume:
        for key, (config, path, _) in jobs.items():
            if Path(path).exists() and (kept := json.loads(Path(path).read_text())).get("config") == config:
                done[key] = kept
    todo = [key for key in jobs if key not in done]
    with tqdm(total=len(jobs), initial=len(done), desc="runs", unit="run", disable=not progress) as bar:
        if workers == 1:
            for key in todo:
                done[key] = run_to_file(*jobs[key], resume, threads, progress)
                bar.update()
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(run_to_file, *jobs[key], resume, threads, False): key for key in todo}
                for future in as_completed(futures):
                    key = futures[future]
                    done[key] = future.result()
                    bar.set_postfix_str(f"{key[0]} seed {key[1]}: acc {done[key]['final_accuracy']:.3f}")
                    bar.update()
    return {s: [done[s, seed] for seed in seeds] for s in strategies}


def summarize(results: dict[str, list[dict]]) -> dict:
    """Per strategy, lists with one entry per seed (``final_accuracy``, ``rounds_to_target`` with None
    where never reached, ``best_accuracy``, ``final_load_cv``, bytes, simulated time) and the mean and
    sample standard deviation of the final accuracy."""
    summary = {}
    for name, runs in results.items():
        final = [r["final_accuracy"] for r in runs]
        known = [a for a in final if a is not None]
        summary[name] = {
            "seeds": [r["config"]["seed"] for r in runs],
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
