"""A small decoder-only MoE transformer language model and its next-token task.

:class:`MoETransformer`: token embedding + learned positions, pre-norm blocks of causal self-attention
(``scaled_dot_product_attention(is_causal=True)``) and an MoE feed-forward (:class:`MoELayer`, token-level
top-k routing), a final norm and a linear head. Expert ``e`` of every block is row ``e`` of the one expert
bank [E, blocks * P]: block ``b`` holds columns ``b*P:(b+1)*P``. :class:`LanguageModelTask` scores it at
every position of the window.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.models.moe import MoELayer, MoEStats

__all__ = ["LMOutputs", "LanguageModelTask", "MoETransformer"]


class LMOutputs(NamedTuple):
    """What :class:`MoETransformer` returns for windows [n, L]: ``logits`` float32 [n, L, V] (position t
    predicts token t+1) and ``tokens`` int64 [n, L], the input windows (the task's targets are the windows
    shifted by one)."""

    logits: torch.Tensor
    tokens: torch.Tensor


class Block(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``h + moe(norm(h))``; x float32 [n, L, d_model]."""

    def __init__(self, d_model: int, heads: int, moe: MoELayer):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.moe = moe

    def forward(self, x: torch.Tensor, bank: nn.Parameter) -> tuple[torch.Tensor, MoEStats]:
        n, length, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(n, length, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [n, heads, L, d / heads]
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, length, d))
        mixed, stats = self.moe(self.ffn_norm(x), bank)
        return x + mixed, stats


def merge_stats(stats: list[MoEStats]) -> MoEStats:
    """One token's routing over all blocks: slots side by side (``expert_idx``/``weights`` [T, blocks*k]),
    ``counts`` and ``dropped`` summed, ``aux_loss``, ``gate_mass`` and ``route_loss`` averaged over the
    blocks (so that ``gate_mass / T`` is still a distribution and a balanced ``aux_loss`` still 1)."""
    return MoEStats(
        aux_loss=torch.stack([s.aux_loss for s in stats]).mean(),
        expert_idx=torch.cat([s.expert_idx for s in stats], 1),
        weights=torch.cat([s.weights for s in stats], 1),
        counts=torch.stack([s.counts for s in stats]).sum(0),
        dropped=torch.stack([s.dropped for s in stats]).sum(),
        gate_mass=torch.stack([s.gate_mass for s in stats]).mean(0),
        route_loss=torch.stack([s.route_loss for s in stats]).mean(),
    )


class MoETransformer(nn.Module):
    """Token windows int64 [n, L'] (L' <= ``context``) -> (:class:`LMOutputs`, MoEStats over the n*L' tokens).

    Args:
        vocab_size: V, token ids in [0, V).
        context: L, the longest window (learned positions).
        d_model, heads: token width and attention heads (``d_model % heads == 0``).
        d_hidden, num_experts, top_k: each block's MoE feed-forward (:class:`MoELayer`).
        blocks: number of blocks.
        expert_compute: of the MoE layers (:class:`MoELayer`); "loop", the default, was the fastest measured
            on CPU (docs/kernels.md, MoE transformer training throughput).
        moe_kwargs: more :class:`MoELayer` options: ``backend``; ``capacity_factor``, with which a token's
            routing depends on the whole batch, later tokens included (causality then holds no more).

    The stats' ``expert_idx`` / ``weights`` have ``blocks * top_k`` slots per token (block-major).
    """

    def __init__(self, vocab_size: int, context: int, *, d_model: int = 32, d_hidden: int = 64,
                 num_experts: int = 8, top_k: int = 2, blocks: int = 2, heads: int = 4,
                 expert_compute: str = "loop", **moe_kwargs):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context", context), ("blocks", blocks),
                            ("heads", heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be a multiple of heads={heads}")
        self.vocab_size, self.context = vocab_size, context
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.empty(context, d_model))
        p = MoELayer.expert_size_of(d_model, d_hidden)
        layers = [MoELayer(d_model, d_hidden, num_experts, top_k, bank_offset=b * p,
                           expert_compute=expert_compute, **moe_kwargs) for b in range(blocks)]
        self.block_expert_size = p  # P: one block's share of a bank row
        self.expert_bank = nn.Parameter(torch.empty(num_experts, blocks * p))
        self.blocks = nn.ModuleList(Block(d_model, heads, moe) for moe in layers)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, std=0.02)
            nn.init.normal_(self.position, std=0.02)
            for block in self.blocks:
                block.moe.reset_experts(self.expert_bank)

    @property
    def num_experts(self) -> int:
        return self.expert_bank.shape[0]

    @property
    def units_per_sample(self) -> int:
        """L: a window is at most ``context`` units (tokens) of the loss."""
        return self.context

    def set_expert_mask(self, mask: torch.Tensor | None) -> None:
        """Route every block only to the experts where ``mask`` (bool [E]) is True; None allows all."""
        for block in self.blocks:
            block.moe.set_expert_mask(mask)

    def named_shared_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """All parameters except the expert bank: embeddings, attention, routers, norms and head."""
        return ((name, p) for name, p in self.named_parameters() if p is not self.expert_bank)

    def forward(self, tokens: torch.Tensor) -> tuple[LMOutputs, MoEStats]:
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.context or tokens.is_floating_point():
            raise ValueError(f"tokens must be integer ids [n, L] with 1 <= L <= {self.context}, got "
                             f"{tokens.dtype} {tuple(tokens.shape)}")
        tokens = tokens.long()
        x = self.embed(tokens) + self.position[:tokens.shape[1]]
        stats = []
        for block in self.blocks:  # the bank goes whole: each block's MoE layer reads its own columns
            x, block_stats = block(x, self.expert_bank)
            stats.append(block_stats)
        return LMOutputs(self.head(self.norm(x)), tokens), merge_stats(stats)


class LanguageModelTask:
    """Next-token prediction at every position: for windows [n, L] with next tokens ``targets`` int64 [n],
    position t's target is token t+1 of the window and the last position's is ``targets`` (units: n*L
    tokens, position-major within a window)."""

    @staticmethod
    def sequence_targets(outputs: LMOutputs, targets: torch.Tensor) -> torch.Tensor:
        """int64 [n, L]: the windows shifted by one, ending with ``targets``."""
        return torch.cat([outputs.tokens[:, 1:], targets.view(-1, 1)], 1)

    def loss(self, outputs: LMOutputs, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the n*L units ("none": float32 [n*L])."""
        wanted = self.sequence_targets(outputs, targets).flatten()
        return F.cross_entropy(outputs.logits.flatten(0, 1), wanted, reduction=reduction)

    def correct(self, outputs: LMOutputs, targets: torch.Tensor) -> torch.Tensor:
        """bool [n*L]: whether the top logit is the target, at every position."""
        return (outputs.logits.argmax(-1) == self.sequence_targets(outputs, targets)).flatten()

    def metrics(self, outputs: LMOutputs, targets: torch.Tensor) -> dict[str, float]:
        """Sums over the batch (they add across batches): ``last_correct``, windows whose last position
        predicts ``targets`` (LEAF's metric: accuracy = last_correct / last_units), and ``last_units``, n."""
        hits = outputs.logits[:, -1].argmax(-1) == targets
        return {"last_correct": float(hits.sum()), "last_units": float(hits.numel())}
