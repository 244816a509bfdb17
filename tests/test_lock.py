"""Pattern lock: masks from (W != 0) survive optimizer steps bit for bit."""
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from sparse_ofa import magnitude_prune_
from sparse_ofa.training.lock import PatternLock


def tiny_classifier():
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))


def test_lock_keeps_masks_bit_for_bit_through_adamw():
    model = tiny_classifier()
    magnitude_prune_(model, 0.8, "1x4")
    before = {n: (m.weight != 0).clone() for n, m in model.named_modules() if n in PatternLock(model).layers}
    lock = PatternLock(model)
    assert "bert.pooler.dense" in lock.masks and "classifier" not in lock.masks
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.01)
    ids = torch.randint(0, 100, (4, 8))
    labels = torch.tensor([0, 1, 2, 1])
    dense_before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    for _ in range(4):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        lock.apply()
    layer = model.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(layer.detach(), dense_before)  # training did move the kept weights
    for name, mask in before.items():
        weight = model.get_submodule(name).weight
        # pooler is dense (all kept); kept weights are nonzero after training with overwhelming probability
        assert torch.equal(weight != 0, mask), name
        assert torch.equal(lock.masks[name], mask)


def test_without_apply_adam_momentum_would_revive_weights():
    """Why apply() exists: gradient hooks alone don't stop AdamW from moving pruned weights."""
    layer_model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        layer_model[0].weight[:, :4] = 0
    opt = torch.optim.AdamW(layer_model.parameters(), lr=0.1)
    layer_model(torch.randn(2, 8)).sum().backward()
    opt.step()  # momentum now nonzero for weights that will become pruned below
    lock_weight = layer_model[0].weight
    with torch.no_grad():
        lock_weight[:, 4] = 0
    lock = PatternLock(layer_model, filter_fn=lambda m, n: True)
    opt.zero_grad()
    layer_model(torch.randn(2, 8)).sum().backward()
    assert bool((lock_weight.grad[:, 4] == 0).all())  # hook zeroed the gradient
    opt.step()
    assert bool((lock_weight[:, 4] != 0).any())  # ... but momentum moved it
    lock.apply()
    assert bool((lock_weight[:, 4] == 0).all())


def test_lock_state_dict_round_trip_and_mismatch():
    model = tiny_classifier()
    magnitude_prune_(model, 0.5)
    lock = PatternLock(model)
    state = lock.state_dict()
    other_model = tiny_classifier()
    other = PatternLock(other_model)
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[n], lock.masks[n]) for n in lock.masks)
    enc = other_model.bert.encoder.layer[1].output.dense.weight
    assert torch.equal(enc != 0, lock.masks["bert.encoder.layer.1.output.dense"])
    bad = {"masks": dict(state["masks"])}
    bad["masks"].pop("bert.pooler.dense")
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(bad)


def test_lock_on_frozen_weights_still_zeroes_them():
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight[0] = 0
    model[0].weight.requires_grad_(False)
    lock = PatternLock(model, filter_fn=lambda m, n: True)
    with torch.no_grad():
        model[0].weight[0] = 1.0
    lock.apply()
    assert bool((model[0].weight[0] == 0).all()) and bool((model[0].weight[1:] != 0).all())
