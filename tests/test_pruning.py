"""GMP schedule, per-layer exact sparsity, zero gradients on pruned weights, pattern checks."""
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from sparse_ofa.training.pruning import GMPSchedule, Pruner, default_prune_filter, format_report, weight_sparsity


def tiny_bert(**overrides):
    cfg = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64)
    cfg.update(overrides)
    return BertForMaskedLM(BertConfig(**cfg))


def test_schedule_matches_cubic_formula():
    s = GMPSchedule(final_sparsity=0.9, initial_sparsity=0.1, start_step=10, ramp_steps=40, update_every=10)
    for t in range(10, 51):
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 10) / 40) ** 3
        assert s.sparsity_at(t) == pytest.approx(expected, abs=1e-12)
    assert s.sparsity_at(0) == pytest.approx(0.1)
    assert s.sparsity_at(1000) == pytest.approx(0.9)
    assert [t for t in range(0, 100) if s.is_update_step(t)] == [10, 20, 30, 40, 50]


def test_schedule_end_step_and_ramp_end_always_update():
    s = GMPSchedule(final_sparsity=0.5, start_step=0, ramp_steps=25, update_every=10, end_step=45)
    assert [t for t in range(100) if s.is_update_step(t)] == [0, 10, 20, 25, 30, 40]


@pytest.mark.parametrize("kwargs, message", [
    (dict(final_sparsity=1.0), "final_sparsity"),
    (dict(final_sparsity=-0.1), "final_sparsity"),
    (dict(final_sparsity=0.5, initial_sparsity=0.6), "exceeds"),
    (dict(final_sparsity=0.5, start_step=10, end_step=5), "precedes start_step"),
    (dict(final_sparsity=0.5, start_step=0, ramp_steps=100, end_step=50), "end of the ramp"),
    (dict(final_sparsity=0.5, update_every=0), "update_every"),
    (dict(final_sparsity=0.5, ramp_steps=-1), "ramp_steps"),
])
def test_schedule_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GMPSchedule(**kwargs)


def test_default_filter_selects_encoder_and_pooler_only():
    from transformers import BertForPreTraining

    model = BertForPreTraining(tiny_bert().config)
    names = [n for n, m in model.named_modules() if default_prune_filter(m, n)]
    assert "bert.pooler.dense" in names
    assert len(names) == 2 * 6 + 1
    assert not any("cls." in n or "embeddings" in n for n in names)


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.9), ("1x4", 0.75), ("2:4", 0.5)])
def test_every_layer_ends_at_exact_sparsity(pattern, sparsity):
    model = tiny_bert()
    pruner = Pruner(model, GMPSchedule(sparsity, ramp_steps=4, update_every=2), pattern=pattern)
    for step in range(6):
        pruner.step(step)
    for name, layer in pruner.layers.items():
        units = layer.weight.numel() // (4 if pattern == "1x4" else 1)
        assert pruner.report()[name] == pytest.approx(round(sparsity * units) / units, abs=1e-12)
        zeros = weight_sparsity(model)[name]
        assert zeros >= pruner.report()[name]
    if pattern == "1x4":
        from sparse_ofa.formats import pattern_violation
        for layer in pruner.layers.values():
            assert pattern_violation(layer.weight != 0, "1x4") is None
    assert "mean sparsity" in format_report(pruner.report(), sparsity)


def test_intermediate_updates_follow_schedule_and_masks_grow():
    model = tiny_bert()
    schedule = GMPSchedule(0.8, ramp_steps=30, update_every=10)
    pruner = Pruner(model, schedule)
    previous = None
    for step in range(31):
        changed = pruner.step(step)
        assert changed == (step in (0, 10, 20, 30) and schedule.sparsity_at(step) > 0)
        if schedule.is_update_step(step):
            assert pruner.overall_sparsity() == pytest.approx(schedule.sparsity_at(step), abs=2e-3)
            if previous is not None:  # pruned weights are zero, so they stay pruned
                assert all(bool((pruner.masks[n] <= previous[n]).all()) for n in previous)
            previous = {n: m.clone() for n, m in pruner.masks.items()}


def test_pruned_weights_get_zero_gradient_and_stay_zero():
    model = tiny_bert()
    pruner = Pruner(model, GMPSchedule(0.7, ramp_steps=0))
    pruner.step(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 100, (2, 8))
    for _ in range(3):
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        for name, layer in pruner.layers.items():
            assert bool((layer.weight.grad[~pruner.masks[name]] == 0).all())
            assert bool((layer.weight.grad[pruner.masks[name]] != 0).any())
        opt.step()
        pruner.apply_masks()
        for name, layer in pruner.layers.items():
            assert torch.equal(layer.weight != 0, pruner.masks[name] & (layer.weight != 0))
            assert bool((layer.weight[~pruner.masks[name]] == 0).all())


def test_pattern_shape_mismatch_is_rejected_before_any_step():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8))
    with pytest.raises(ValueError, match=r"divisible by 4.*: 1 \(in_features 6\)"):
        Pruner(model, GMPSchedule(0.5), pattern="1x4", filter_fn=lambda m, n: True)
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        Pruner(tiny_bert(), GMPSchedule(0.5), pattern="4x1")
    for impossible in (0.9, 0.3):  # 2:4 is exactly half of every group of 4
        with pytest.raises(ValueError, match="final_sparsity must be 0.5"):
            Pruner(tiny_bert(), GMPSchedule(impossible), pattern="2:4")
    with pytest.raises(ValueError, match="no Linear layer matched"):
        Pruner(nn.Sequential(nn.Linear(4, 4)), GMPSchedule(0.5))


def test_lr_rewinding_resets_lr_at_each_ramp_update():
    model = tiny_bert()
    pruner = Pruner(model, GMPSchedule(0.5, ramp_steps=4, update_every=2), rewind_lr=True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e))
    lrs = []
    for step in range(7):
        pruner.step(step, opt, sched)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # updates at 0, 2, 4 rewind to lr 1.0; after the ramp the schedule continues from the last rewind
    assert lrs == pytest.approx([1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1 / 3])


def test_state_dict_round_trip():
    model = tiny_bert()
    pruner = Pruner(model, GMPSchedule(0.6, ramp_steps=0))
    pruner.step(0)
    state = pruner.state_dict()
    fresh = tiny_bert()
    fresh.load_state_dict(model.state_dict())
    other = Pruner(fresh, GMPSchedule(0.6, ramp_steps=0))
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[n], pruner.masks[n]) for n in pruner.masks)
    assert other.last_update == 0 and not other.step(0)
    with pytest.raises(ValueError, match="pattern"):
        Pruner(fresh, GMPSchedule(0.6), pattern="1x4").load_state_dict(state)


def test_schedule_accepts_numpy_numbers():
    import numpy as np

    assert GMPSchedule(np.float32(0.5), ramp_steps=0).sparsity_at(0) == pytest.approx(0.5)


def test_prune_lowest_matches_a_stable_argsort():
    # the selection (kthvalue + earliest ties) must prune exactly what a stable argsort would:
    # ties by position, NaN above +inf, -inf first, every count from 0 to all
    from sparse_ofa.masks import _prune_lowest

    def by_argsort(scores, count):
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        keep[torch.argsort(scores.flatten(), stable=True)[:count]] = False
        return keep.view(scores.shape)

    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        n = int(torch.randint(1, 200, (1,), generator=g))
        if trial % 3 == 0:
            scores = torch.randn(n, generator=g)
        else:  # few distinct values: many ties, with inf, -inf and NaN among them
            scores = torch.tensor([1.0, 2.0, float("inf"), float("nan"), -float("inf"), 0.5])[
                torch.randint(0, 6 if trial % 3 == 2 else 2, (n,), generator=g)]
        for count in {0, n, int(torch.randint(0, n + 1, (1,), generator=g))}:
            got = _prune_lowest(scores.view(1, n), count)
            assert torch.equal(got, by_argsort(scores.view(1, n), count)), (scores, count)
            assert int((~got).sum()) == count
