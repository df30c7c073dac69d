"""Local training throughput of the MoE transformer language model on this CPU, against the same model with
its feed-forward swapped for (a) the expert loop most FL code uses and (b) a dense FFN of equal active FLOPs.

* fedmoe: :class:`fedmoe.models.MoETransformer` as ``[model] kind = "transformer"`` builds it (each block's
  MoE layer on ``fedmoe_kernels`` route / dispatch / combine, ``expert_compute="loop"``); also with
  ``expert_compute="grouped_mm"`` where torch has it.
* mixtral-loop: Hugging Face Mixtral's sparse-MoE block (``MixtralSparseMoeBlock.forward``) in plain torch:
  softmax router, top-k, renormalised weights, a one-hot expert mask, then per expert ``torch.where``, a
  gather, the expert FFN (its own ``nn.Linear`` modules), scaling and ``index_add_``; the same
  load-balancing loss. Its router and experts are copies of fedmoe's (outputs checked equal first).
* dense: ``Linear(d_model, top_k * d_hidden)``, GELU, ``Linear(top_k * d_hidden, d_model)``: the MoE
  layer's active FLOPs per token, no router.

A step is forward, the next-character loss (+ 0.01 x load-balancing loss) and backward on a batch of 32
windows of 80 tokens (``[train] batch_size`` x LEAF's window), vocabulary 81. Throughput = tokens / median
step time; the variants alternate for several rounds and each keeps its best median (damping the noise of
other processes on shared cores). The FFN alone (block 0's, same tokens) is timed the same way.

    python benchmarks/bench_moe_lm.py [--quick] [--threads 1 2] [--out-dir benchmarks/results]

Writes ``moe_lm_cpu[_quick].json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_model, machine_info
from torch import nn

from fedmoe.data import DataSpec
from fedmoe.models import (
    LanguageModelTask,
    ModelConfig,
    MoELayer,
    MoEStats,
    build_model,
    grouped_mm_available,
)

BATCH, WINDOW, VOCAB, AUX = 32, 80, 81, 0.01
TARGETS = {"fedmoe_vs_mixtral_loop": 2.0, "dense_vs_fedmoe": 1.5}  # >= 2x the loop, within 1.5x of dense
CONFIGS = {  # name -> [model] options beyond kind = "transformer"
    "full": {"default": {}, "wide": {"d_model": 64, "d_hidden": 128},
             "experts32": {"num_experts": 32}, "experts64": {"num_experts": 64}},
    "quick": {"default": {}, "experts32": {"num_experts": 32}},
}


class MixtralLoopFFN(nn.Module):
    """HF Mixtral's sparse-MoE block in plain torch, with copies of ``moe``'s router and experts (the
    experts of ``bank``) as its own modules; ``forward(x [..., d], bank) -> (y, MoEStats)`` like
    :class:`MoELayer` (the bank argument is ignored)."""

    def __init__(self, moe: MoELayer, bank: torch.Tensor):
        super().__init__()
        self.top_k, self.num_experts, self.d_model = moe.top_k, moe.num_experts, moe.d_model
        self.gate = copy.deepcopy(moe.router)
        self.experts = nn.ModuleList()
        with torch.no_grad():
            for w1, b1, w2, b2 in zip(*moe.expert_weights(bank), strict=True):
                up, down = nn.Linear(moe.d_model, moe.d_hidden), nn.Linear(moe.d_hidden, moe.d_model)
                up.weight.copy_(w1.t()), up.bias.copy_(b1), down.weight.copy_(w2.t()), down.bias.copy_(b2)
                self.experts.append(nn.Sequential(up, nn.GELU(), down))

    def forward(self, x: torch.Tensor, bank: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        hidden = x.reshape(-1, self.d_model)
        router_logits = self.gate(hidden)
        probs = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(probs, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        final = torch.zeros_like(hidden)
        expert_mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            idx, top_x = torch.where(expert_mask[e])
            current_state = hidden[None, top_x].reshape(-1, self.d_model)
            current = expert(current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden.dtype))
        counts = expert_mask.sum((1, 2))
        aux = self.num_experts * (counts.float() / selected.numel() * probs.mean(0)).sum()
        stats = MoEStats(aux, selected, routing_weights, counts, torch.zeros((), dtype=torch.int64),
                         probs.detach().sum(0, dtype=torch.float64), torch.zeros(()))
        return final.view(x.shape), stats


class DenseFFN(nn.Module):
    """``d_model -> top_k * d_hidden -> d_model`` with GELU: the MoE layer's active FLOPs per token."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.up = nn.Linear(moe.d_model, moe.top_k * moe.d_hidden)
        self.down = nn.Linear(moe.top_k * moe.d_hidden, moe.d_model)

    def forward(self, x: torch.Tensor, bank: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        t = x.numel() // x.shape[-1]
        one = torch.zeros((t, 1), dtype=torch.int64)
        stats = MoEStats(torch.zeros(()), one, torch.ones((t, 1)), torch.tensor([t]),
                         torch.zeros((), dtype=torch.int64), torch.full((1,), float(t), dtype=torch.float64),
                         torch.zeros(()))
        return self.down(F.gelu(self.up(x))), stats


def variants(options: dict) -> dict[str, nn.Module]:
    """The models to time, all built from one seed: fedmoe (and its grouped_mm path), mixtral-loop, dense."""
    config = ModelConfig(kind="transformer", **options)
    spec = DataSpec((WINDOW,), VOCAB)
    fedmoe = build_model(config, spec, seed=0)
    models = {"fedmoe": fedmoe}
    if grouped_mm_available("cpu", torch.float32):
        models["fedmoe_grouped_mm"] = copy.deepcopy(fedmoe)
        for block in models["fedmoe_grouped_mm"].blocks:
            block.moe.expert_compute = "grouped_mm"
    swaps = (("mixtral_loop", lambda moe: MixtralLoopFFN(moe, fedmoe.expert_bank)), ("dense", DenseFFN))
    for name, make in swaps:
        model = copy.deepcopy(fedmoe)
        for block in model.blocks:
            block.moe = make(block.moe)
        models[name] = model
    return models


def check(models: dict[str, nn.Module], tokens: torch.Tensor) -> float:
    """The largest logit difference of mixtral-loop and grouped_mm from fedmoe (they compute the same)."""
    with torch.no_grad():
        want = models["fedmoe"](tokens)[0].logits
        worst = 0.0
        for name in ("mixtral_loop", "fedmoe_grouped_mm"):
            if name in models:
                got = models[name](tokens)[0].logits
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                worst = max(worst, float((got - want).abs().max()))
    return worst


def median_seconds(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor):
    task = LanguageModelTask()

    def step():
        outputs, stats = model(tokens)
        loss = task.loss(outputs, targets) + AUX * stats.aux_loss
        model.zero_grad(set_to_none=True)
        loss.backward()

    return step


def ffn_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    ffn, bank = model.blocks[0].moe, model.expert_bank

    def step():
        out, stats = ffn(x, bank)
        loss = (out * grad).sum() + AUX * stats.aux_loss
        model.zero_grad(set_to_none=True)
        x.grad = None
        loss.backward()

    return step


def time_all(steps: dict, rounds: int, repeats: int) -> dict[str, float]:
    """Best (lowest) median seconds of each step over ``rounds`` alternating rounds."""
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], median_seconds(step, repeats))
    return best


def ratios(tokens_per_s: dict[str, float]) -> dict[str, float]:
    return {"fedmoe_vs_mixtral_loop": tokens_per_s["fedmoe"] / tokens_per_s["mixtral_loop"],
            "dense_vs_fedmoe": tokens_per_s["dense"] / tokens_per_s["fedmoe"]}


def bench(name: str, options: dict, threads: int, rounds: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, WINDOW), generator=gen)
    targets = torch.randint(0, VOCAB, (BATCH,), generator=gen)
    models = variants(options)
    worst = check(models, tokens)
    fedmoe = models["fedmoe"]
    moe = fedmoe.blocks[0].moe
    d = moe.d_model
    x = torch.randn((BATCH * WINDOW, d), generator=gen).requires_grad_()
    grad = torch.randn((BATCH * WINDOW, d), generator=gen)
    n = BATCH * WINDOW
    row = {"config": name, "threads": threads,
           "model": {"kind": "transformer", **ModelConfig(kind="transformer", **options).__dict__},
           "params": {"shared": sum(p.numel() for _, p in fedmoe.named_shared_parameters()),
                      "expert_bank": list(fedmoe.expert_bank.shape),
                      "bytes_per_expert": fedmoe.expert_bank.shape[1] * 4},
           "active_ffn_flops_per_token": 2 * 2 * d * moe.d_hidden * moe.top_k * len(fedmoe.blocks),
           "max_logit_difference": worst}
    row["model"]["channels"] = list(row["model"]["channels"])
    for part, make, args in (("model", model_step, (tokens, targets)), ("ffn", ffn_step, (x, grad))):
        seconds = time_all({k: make(m, *args) for k, m in models.items()}, rounds, repeats)
        speed = {k: n / s for k, s in seconds.items()}
        row[part] = {k: {"ms": seconds[k] * 1e3, "tokens_per_s": speed[k]} for k in seconds}
        row[f"{part}_ratios"] = ratios(speed)
    r = row["model_ratios"]
    row["targets_met"] = {"fedmoe_vs_mixtral_loop": r["fedmoe_vs_mixtral_loop"] >= 2.0,
                          "dense_vs_fedmoe": r["dense_vs_fedmoe"] <= 1.5}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two configurations, one round: a smoke test")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (best median kept)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per median")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    rounds, steps = (1, 3) if args.quick else (args.rounds, args.steps)
    results = {
        "machine": machine_info(device=f"cpu: {cpu_model()}", torch=torch.__version__),
        "setup": {"batch_windows": BATCH, "window": WINDOW, "tokens_per_step": BATCH * WINDOW, "vocab": VOCAB,
                  "aux_loss": AUX, "step": "forward + loss + backward (zero_grad, no optimizer step)",
                  "rounds": rounds, "steps_per_median": steps, "dtype": "float32"},
        "baselines": {"mixtral_loop": "HF MixtralSparseMoeBlock.forward pattern in plain torch: one-hot "
                                      "expert mask, torch.where per expert, gather, nn.Linear FFN, "
                                      "index_add_",
                      "dense": "Linear(d, top_k*d_hidden) + GELU + Linear(top_k*d_hidden, d)"},
        "targets": TARGETS,
        "results": [],
    }
    print(f"{'config':>10} {'thr':>3} | tokens/s: {'fedmoe':>8} {'grouped':>8} {'mixtral':>8} {'dense':>8} | "
          f"fedmoe/mixtral  dense/fedmoe | FFN alone: fedmoe/mixtral  dense/fedmoe", flush=True)
    for name, options in CONFIGS[size].items():
        for threads in args.threads:
            row = bench(name, options, threads, rounds, steps)
            results["results"].append(row)
            speed = {k: v["tokens_per_s"] for k, v in row["model"].items()}
            m, f = row["model_ratios"], row["ffn_ratios"]
            print(f"{name:>10} {threads:>3} | {speed['fedmoe']:>18,.0f} "
                  f"{speed.get('fedmoe_grouped_mm', 0):>8,.0f} {speed['mixtral_loop']:>8,.0f} "
                  f"{speed['dense']:>8,.0f} | {m['fedmoe_vs_mixtral_loop']:>14.2f}x "
                  f"{m['dense_vs_fedmoe']:>12.2f}x | "
                  f"{f['fedmoe_vs_mixtral_loop']:>25.2f}x {f['dense_vs_fedmoe']:>12.2f}x", flush=True)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    path = args.out_dir / f"moe_lm_cpu{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
