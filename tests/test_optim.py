"""The optimizer factory and the LR schedules shared by the demo and the training commands."""
import pytest
import torch
from transformers import BertConfig, BertModel

from sparse_ofa.training.optim import adamw, gmp_lr_factor, warmup_linear_decay
from sparse_ofa.training.pruning import GMPSchedule


def _model():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32), add_pooling_layer=False)
    model.embeddings.requires_grad_(False)
    return model


def test_adamw_decays_matrices_only_and_leaves_frozen_parameters_out():
    model = _model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    decayed = adamw(model, 1e-3, weight_decay=0.01)
    (matrices, decay), (vectors, none) = [(g["params"], g["weight_decay"]) for g in decayed.param_groups]
    assert decay == 0.01 and none == 0.0
    assert all(p.dim() >= 2 for p in matrices) and all(p.dim() < 2 for p in vectors)
    assert {id(p) for p in matrices + vectors} == {id(p) for p in trainable}
    plain = adamw(model, 2e-3, eps=1e-6, fused=True)  # one group in parameter order; fused where torch has it
    (group,) = plain.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert group["weight_decay"] == 0.0 and group["eps"] == 1e-6 and group["lr"] == 2e-3


def test_warmup_linear_decay():
    factor = warmup_linear_decay(4, 10)
    assert [factor(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factor(4) == 1.0 and factor(7) == pytest.approx(0.5) and factor(10) == 0.0 and factor(12) == 0.0
    no_warmup = warmup_linear_decay(0, 10)
    assert no_warmup(0) == 1.0 and no_warmup(5) == pytest.approx(0.5)


def test_gmp_lr_factor_is_gentle_before_the_ramp_and_full_at_its_end():
    gmp = GMPSchedule(0.9, 0.0, start_step=0, ramp_steps=100, update_every=10)
    gentle = [gmp_lr_factor(t, 120, 10, gmp, "sparsity", 0.05) for t in range(120)]
    flat = [gmp_lr_factor(t, 120, 10, gmp, "flat") for t in range(120)]
    assert flat[:10] == pytest.approx([(t + 1) / 10 for t in range(10)]) and set(flat[10:100]) == {1.0}
    # the cubic ramp: s(t + 1) / s_final, floored at 5 %, times the warm-up while it lasts
    assert gentle[0] == pytest.approx(0.05 * 0.1)
    assert gentle[50] == pytest.approx(1 - (1 - 51 / 100) ** 3)
    assert gentle[:100] == sorted(gentle[:100]) and gentle[99] == 1.0
    assert gentle[100:] == flat[100:] and gentle[-1] == pytest.approx(1.0 - 0.9 * 19 / 20)
    assert gmp_lr_factor(5, 60, 10) == pytest.approx(0.6) and gmp_lr_factor(30, 60, 10) == pytest.approx(1 - 0.9 * 0.5)
