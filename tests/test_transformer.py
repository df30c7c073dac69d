"""The MoE transformer language model: causality, the expert bank and masks, the next-token task, training,
checkpoints and a federated run."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from fedmoe.data import Dataset, DataSpec
from fedmoe.federated import FederatedConfig, run_experiment
from fedmoe.models import (
    FederatedMoE,
    LanguageModelTask,
    ModelConfig,
    MoELayer,
    MoETransformer,
    Task,
    build_model,
    build_task,
    grouped_mm_available,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("to be or not to be that is the question whether tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune or to take arms against a sea of troubles ")
SMALL = {"d_model": 16, "d_hidden": 16, "num_experts": 4, "top_k": 2, "blocks": 2, "heads": 2}


def windows(length: int, copies: int = 4) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every window of ``length`` characters of TEXT repeated: (x int64 [N, length], next token [N],
    vocabulary size)."""
    vocab = sorted(set(TEXT))
    ids = torch.tensor([vocab.index(c) for c in TEXT * copies])
    x = ids.unfold(0, length, 1)[:-1]
    return x.contiguous(), ids[length:], len(vocab)


def small_model(vocab: int = 30, context: int = 12, seed: int = 0, **kwargs) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(vocab, context, **(SMALL | kwargs))


def test_a_later_token_never_changes_an_earlier_output():
    model = small_model()
    x = torch.randint(0, 30, (5, 12), generator=torch.Generator().manual_seed(1))
    logits = model(x)[0].logits
    for t in (0, 5, 10):
        changed = x.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 7) % 30
        again = model(changed)[0].logits
        torch.testing.assert_close(again[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(again[:, t + 1:], logits[:, t + 1:])
    torch.testing.assert_close(model(x[:, :6])[0].logits, logits[:, :6], rtol=0, atol=1e-6)  # a prefix


def test_it_follows_the_protocol_and_expert_e_of_every_block_is_row_e():
    model = small_model()
    assert isinstance(model, FederatedMoE) and isinstance(LanguageModelTask(), Task)
    p = model.block_expert_size
    assert p == 16 * 16 + 16 + 16 * 16 + 16
    assert model.expert_bank.shape == (4, 2 * p) and model.num_experts == 4
    shared = dict(model.named_shared_parameters())
    assert all(param is not model.expert_bank for param in shared.values())
    assert sum(x.numel() for x in shared.values()) + model.expert_bank.numel() == \
        sum(x.numel() for x in model.parameters())
    assert [n for n, _ in model.named_parameters() if "bank" in n] == ["expert_bank"]
    bank = model.expert_bank
    before = [[w.clone() for w in block.moe.expert_weights(bank)] for block in model.blocks]
    with torch.no_grad():
        bank[2] += 1.0
    for block, old_weights in zip(model.blocks, before, strict=True):
        for old, new in zip(old_weights, block.moe.expert_weights(bank), strict=True):
            changed = (old != new).flatten(1).any(1)
            assert changed.tolist() == [False, False, True, False]


def test_with_one_expert_allowed_the_output_depends_only_on_its_row_in_every_block():
    model = small_model()
    x = torch.randint(0, 30, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([False, True, False, False])
    model.set_expert_mask(mask)
    logits = model(x)[0].logits
    with torch.no_grad():
        model.expert_bank[[0, 2, 3]] = float("nan")  # never read
    torch.testing.assert_close(model(x)[0].logits, logits, rtol=0, atol=0)
    for block in range(2):  # expert 1's part in each block matters
        with torch.no_grad():
            model.expert_bank[1, block * model.block_expert_size:(block + 1) * model.block_expert_size] += 0.5
        assert not torch.allclose(model(x)[0].logits, logits)


def test_masked_experts_receive_no_tokens_and_no_gradient():
    allowed = torch.tensor([True, False, True, False])
    x, y, vocab = windows(12)
    model = small_model(vocab)
    model.set_expert_mask(allowed)
    outputs, stats = model(x[:8])
    assert stats.expert_idx.shape == (8 * 12, 2 * 2)  # a row per token, top_k slots per block
    assert bool(allowed[stats.expert_idx[stats.expert_idx >= 0]].all())
    assert int(stats.counts[~allowed].sum()) == 0 and int(stats.counts.sum()) == 8 * 12 * 4
    loss = LanguageModelTask().loss(outputs, y[:8]) + 0.01 * stats.aux_loss
    loss.backward()
    assert torch.count_nonzero(model.expert_bank.grad[~allowed]) == 0
    assert torch.count_nonzero(model.expert_bank.grad[allowed]) > 0
    model.set_expert_mask(None)
    assert int(model(x[:8])[1].counts[~allowed].sum()) > 0


def test_stats_hold_the_load_balancing_loss_of_every_block():
    model = small_model()
    x = torch.randint(0, 30, (4, 12), generator=torch.Generator().manual_seed(3))
    _, stats = model(x)
    assert stats.aux_loss.ndim == 0 and stats.aux_loss.item() >= 1.0 - 1e-6
    grads = torch.autograd.grad(stats.aux_loss, [block.moe.router.weight for block in model.blocks])
    assert all(g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(stats.gate_mass.sum(), torch.tensor(48.0, dtype=torch.float64))
    with torch.no_grad():
        for block in model.blocks:
            block.moe.router.weight.zero_()  # uniform router: perfectly balanced
    torch.testing.assert_close(model(x)[1].aux_loss, torch.tensor(1.0))
    model.set_expert_mask(torch.tensor([True, False, False, True]))  # uniform router: half the mass held
    torch.testing.assert_close(model(x)[1].route_loss, torch.tensor(math.log(2.0)))
    assert stats.route_loss.item() == 0.0


def test_the_task_scores_every_position_against_the_shifted_window():
    task = LanguageModelTask()
    x, y, vocab = windows(6)
    model = small_model(vocab, 6)
    outputs, _ = model(x[:5])
    wanted = torch.cat([x[:5, 1:], y[:5, None]], 1)
    assert torch.equal(task.sequence_targets(outputs, y[:5]), wanted)
    assert torch.equal(wanted[:4], x[1:5])  # the windows overlap: the shifted window is the next window
    losses = task.loss(outputs, y[:5], reduction="none")
    assert losses.shape == (30,)
    manual = torch.nn.functional.cross_entropy(outputs.logits.reshape(30, vocab), wanted.reshape(30),
                                               reduction="none")
    torch.testing.assert_close(losses, manual)
    torch.testing.assert_close(task.loss(outputs, y[:5]), manual.mean())
    correct = task.correct(outputs, y[:5])
    assert correct.dtype == torch.bool and correct.shape == (30,)
    assert torch.equal(correct, (outputs.logits.argmax(-1) == wanted).flatten())
    metrics = task.metrics(outputs, y[:5])
    assert metrics == {"last_correct": float(correct.view(5, 6)[:, -1].sum()), "last_units": 5.0}


def test_the_loss_falls_on_a_tiny_corpus():
    x, y, vocab = windows(12)
    model, task = small_model(vocab), LanguageModelTask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # [train] defaults
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        batch = torch.randint(0, len(y), (32,), generator=gen)
        outputs, stats = model(x[batch])
        loss = task.loss(outputs, y[batch])
        optimizer.zero_grad()
        (loss + 0.01 * stats.aux_loss).backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.65 * np.mean(losses[:5])


def test_the_state_dict_round_trips_through_a_file():
    model, other = small_model(seed=0), small_model(seed=1)
    x = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(4))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(other(x)[0].logits, model(x)[0].logits, rtol=0, atol=0)
    assert sum("bank" in key for key in model.state_dict()) == 1


def test_model_config_builds_the_transformer_and_its_task():
    config = ModelConfig(kind="transformer", d_model=16, d_hidden=32, num_experts=4, blocks=3, heads=4)
    spec = DataSpec((20,), 81)
    model = build_model(config, spec, seed=5)
    assert isinstance(model, MoETransformer) and len(model.blocks) == 3
    assert model.context == 20 and model.vocab_size == 81 and model.expert_bank.shape[0] == 4
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  build_model(config, spec, seed=5).state_dict().values(),
                                                  strict=True))
    assert isinstance(build_task(config, spec), LanguageModelTask)
    assert ModelConfig().blocks == 2 and ModelConfig().heads == 4
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(kind="transformer", d_model=10, heads=4)
    with pytest.raises(ValueError, match="token windows"):
        build_model(config, DataSpec((1, 8, 8), 10), seed=0)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 21, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 20))


def test_two_federated_rounds_on_a_tiny_text_dataset():
    x, y, vocab = windows(12, copies=3)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).numpy()
    x, y = x.numpy()[order], y.numpy()[order]
    dataset = Dataset("tiny-text", x[:400], y[:400], x[400:], y[400:], vocab)
    config = FederatedConfig.from_dict({
        "federation": {"num_clients": 4, "clients_per_round": 4, "rounds": 2, "deadline": "none"},
        "model": {"kind": "transformer"} | SMALL, "alignment": {"max_experts": 2},
        "data": {"partition": "iid"}, "simulation": {"dropout": False}})
    result = run_experiment(config, dataset=dataset)
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    assert all(r["accepted"] for r in result["rounds"])
    first, last = result["rounds"][0], result["rounds"][-1]
    assert np.isfinite(last["loss"]) and last["loss"] < first["loss"] < np.log(vocab) + 0.5
    assert 0.0 <= last["accuracy"] <= 1.0
    assert result["model"]["expert_bytes"] == 4 * 2 * (16 * 16 * 2 + 16 + 16)  # float32, both blocks


@pytest.mark.skipif(not grouped_mm_available("cpu", torch.float32), reason="no grouped_mm in this build")
def test_the_expert_compute_paths_agree_on_outputs_and_gradients():
    x = torch.randint(0, 30, (3, 12), generator=torch.Generator().manual_seed(5))
    results = []
    for compute in ("loop", "grouped_mm"):
        model = small_model(expert_compute=compute)
        logits = model(x)[0].logits
        results.append([logits, *torch.autograd.grad(logits.square().sum(), list(model.parameters()))])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_layer_without_a_bank_of_its_own_needs_one_wide_enough():
    layer = MoELayer(4, 8, 3, 2, bank_offset=10)
    assert layer.expert_bank is None and layer.expert_size == MoELayer.expert_size_of(4, 8) == 76
    bank = torch.randn(3, 10 + 76)
    torch.testing.assert_close(layer.expert_weights(bank)[3], bank[:, -4:])  # b2 is the last columns
    assert layer(torch.randn(5, 4), bank)[0].shape == (5, 4)
    for bad in (None, torch.randn(3, 85), torch.randn(4, 86)):
        with pytest.raises(ValueError, match="bank must be"):
            layer(torch.randn(5, 4), bad)
    with pytest.raises(ValueError, match="bank_offset"):
        MoELayer(4, 8, 3, 2, bank_offset=-1)


def _payload(model: MoETransformer, experts: list[int], affinity: bool = False):
    from fedmoe.federated import ClientPayload
    from fedmoe.federated.node import shared_vector

    ids = np.array(experts, dtype=np.int64)
    rows = model.expert_bank.detach()[torch.from_numpy(ids)].clone()
    return ClientPayload(0, 0, ids, shared_vector(model), rows, seed=3, affinity=affinity)


def test_a_replys_affinity_routes_its_tokens_through_the_held_experts():
    """The gate affinity a client sends is the full router's mean distribution over its tokens in the pass
    before training, with the tokens routed only through the experts it holds (in a multi-block model the
    later routers see what those experts made of the tokens), not the unmasked model's."""
    from fedmoe.data import Samples
    from fedmoe.federated import TrainConfig, train_client

    x, y, vocab = windows(12)
    data = Samples(x[:40], y[:40])
    model = small_model(vocab)
    reference = small_model(vocab)
    with torch.no_grad():
        reference.expert_bank[[0, 3]] = float("nan")  # what the client never holds cannot matter
        reference.expert_bank[[1, 2]] = model.expert_bank[[1, 2]]
    reference.set_expert_mask(torch.tensor([False, True, True, False]))
    with torch.no_grad():
        stats = reference(data.inputs)[1]
    want = (stats.gate_mass / stats.expert_idx.shape[0]).numpy()
    workspace = small_model(vocab, seed=9)  # a dirty workspace: other weights everywhere
    sent = train_client(workspace, LanguageModelTask(), _payload(model, [1, 2], affinity=True), data,
                        TrainConfig(max_steps=1)).affinity
    np.testing.assert_allclose(sent, want, rtol=1e-5, atol=1e-7)
    model.set_expert_mask(None)
    with torch.no_grad():
        unmasked = model(data.inputs)[1]
    assert not np.allclose(sent, (unmasked.gate_mass / unmasked.expert_idx.shape[0]).numpy(), atol=1e-4)


def test_the_routing_loss_moves_the_router_rows_of_the_experts_a_client_does_not_hold():
    """Masked routing gives the router rows of the experts a client does not hold no gradient; with
    ``train.route_loss`` they learn (their probability is pushed down)."""
    from fedmoe.data import Samples
    from fedmoe.federated import TrainConfig, train_client
    from fedmoe.federated.node import load_shared

    x, y, vocab = windows(12)
    data = Samples(x[:64], y[:64])
    model = small_model(vocab)
    payload = _payload(model, [1, 2])
    rows = {}
    for weight in (0.0, 1.0):
        update = train_client(small_model(vocab), LanguageModelTask(), payload, data,
                              TrainConfig(max_steps=3, momentum=0.0, route_loss=weight))
        trained = small_model(vocab)
        load_shared(trained, update.shared)
        rows[weight] = torch.stack([block.moe.router.weight[[0, 3]] for block in trained.blocks])
    before = torch.stack([block.moe.router.weight[[0, 3]] for block in model.blocks]).detach()
    assert torch.equal(rows[0.0], before)
    assert not torch.allclose(rows[1.0], before)
    with pytest.raises(ValueError, match="route_loss"):
        TrainConfig(route_loss=-0.1)
