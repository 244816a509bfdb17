"""QAT: fake-quant numerics, EMA observers, convert -> SparseInt8Linear equivalence with static scales."""
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from sparse_ofa import SparseInt8Linear, magnitude_prune_
from sparse_ofa.formats import quantize_weight
from sparse_ofa.training.lock import PatternLock
from sparse_ofa.training.qat import FakeQuantLinear, QATConfig, convert_qat, fake_quant_weight, prepare_qat


def tiny_mlm():
    return BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64))


def test_per_channel_weight_fake_quant_is_quantize_weight_exactly():
    w = torch.randn(8, 12) * torch.rand(8, 1) * 3
    w[2] = 0
    w_q, scale = quantize_weight(w)
    assert torch.equal(fake_quant_weight(w), w_q.float() * scale[:, None])
    per_tensor = fake_quant_weight(w, "per_tensor")
    step = w.abs().max() / 127
    assert torch.allclose(per_tensor / step, torch.round(per_tensor / step), atol=1e-4)


def test_ema_observer_and_uint8_qparams_in_int8_terms():
    layer = FakeQuantLinear(4, 3, config=QATConfig(ema_decay=0.5))
    layer.train()
    layer(torch.tensor([[-1.0, 0.0, 2.0, 3.0]]))
    assert float(layer.act_min) == -1.0 and float(layer.act_max) == 3.0
    layer(torch.tensor([[-3.0, 0.0, 1.0, 5.0]]))
    assert float(layer.act_min) == pytest.approx(-2.0) and float(layer.act_max) == pytest.approx(4.0)
    layer.eval()
    layer(torch.tensor([[-100.0, 0.0, 0.0, 100.0]]))  # eval: range frozen
    assert float(layer.act_max) == pytest.approx(4.0)
    act = layer.sparse_ofa_act_quant()
    assert act.scale == pytest.approx(6.0 / 255)
    assert act.zero_point == round(2.0 / (6.0 / 255)) - 128 and (act.qmin, act.qmax) == (-128, 127)
    sym = FakeQuantLinear(4, 3, config=QATConfig(activation="int8_symmetric"))
    sym(torch.tensor([[-3.0, 0.0, 1.0, 2.0]]))
    act = sym.sparse_ofa_act_quant()
    assert act.scale == pytest.approx(3.0 / 127) and act.zero_point == 0 and act.qmin == -127


def test_straight_through_gradient_is_zero_where_clipped():
    layer = FakeQuantLinear(2, 1, bias=False, config=QATConfig(activation="int8_symmetric"))
    layer(torch.tensor([[1.0, -1.0]]))
    layer.eval()
    x = torch.tensor([[0.5, 4.0]], requires_grad=True)
    layer(x).sum().backward()
    assert x.grad[0, 0] != 0 and x.grad[0, 1] == 0


def test_bad_config_and_unobserved_convert_are_rejected():
    with pytest.raises(ValueError, match="weight_granularity"):
        QATConfig(weight_granularity="per_row")
    with pytest.raises(ValueError, match="activation"):
        QATConfig(activation="fp8")
    model = prepare_qat(tiny_mlm())
    with pytest.raises(ValueError, match="observed no activations"):
        convert_qat(model)
    with pytest.raises(ValueError, match="prepare_qat first"):
        convert_qat(tiny_mlm())


def _qat_train(config, pattern="1x4"):
    torch.manual_seed(0)
    model = tiny_mlm()
    magnitude_prune_(model, 0.75, pattern)
    before = {n: (m.weight != 0).clone() for n, m in model.named_modules() if "encoder.layer" in n and hasattr(m, "weight") and m.weight.dim() == 2}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lock = PatternLock(model)
    prepare_qat(model, config)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, FakeQuantLinear)
    assert not isinstance(model.cls.predictions.decoder, FakeQuantLinear)
    ids = torch.randint(0, 100, (4, 12))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        lock.apply()
    for name, mask in before.items():  # lock still holds through the FakeQuantLinear swap
        assert torch.equal(model.get_submodule(name).weight != 0, mask)
    model.eval()
    test_ids = torch.randint(0, 100, (3, 12))
    with torch.no_grad():
        fake_out = model(input_ids=test_ids).logits
    scales = {n: m.sparse_ofa_act_quant() for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    convert_qat(model, backend="reference")
    with torch.no_grad():
        real_out = model(input_ids=test_ids).logits
    return model, scales, fake_out, real_out


def test_converted_model_matches_fake_quant_model_with_static_scales():
    model, scales, fake_out, real_out = _qat_train(QATConfig())
    for name, act in scales.items():
        module = model.get_submodule(name)
        assert isinstance(module, SparseInt8Linear) and module.act.is_static
        assert module.act == act
        assert module.pattern == ("1x4" if "pooler" not in name else "unstructured")
    err = (real_out - fake_out).abs().max() / fake_out.abs().max()
    assert err < 1e-5, float(err)


def test_single_layer_convert_is_exact_up_to_float_rounding():
    layer = FakeQuantLinear(16, 8)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(8, 16) > 0.6)
    x = torch.randn(5, 16) * 2
    layer(x)
    layer.eval()
    sparse = SparseInt8Linear.from_linear(layer, act=layer.sparse_ofa_act_quant(), backend="reference")
    assert torch.allclose(sparse(x), layer(x), rtol=1e-5, atol=1e-5)


def test_per_tensor_and_symmetric_convert_within_looser_tolerance():
    _, _, fake_out, real_out = _qat_train(QATConfig(weight_granularity="per_tensor",
                                                     activation="int8_symmetric"), pattern="unstructured")
    err = (real_out - fake_out).abs().max() / fake_out.abs().max()
    cos = torch.nn.functional.cosine_similarity(real_out.flatten(), fake_out.flatten(), dim=0)
    assert err < 1e-2 and cos > 0.999, (float(err), float(cos))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qat_on_cuda_converts_to_gpu_backends():
    torch.manual_seed(0)
    model = tiny_mlm().cuda()
    magnitude_prune_(model, 0.5, "2:4")
    lock = PatternLock(model)
    prepare_qat(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 100, (4, 16), device="cuda")
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        lock.apply()
    model.eval()
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    convert_qat(model)  # backend "auto" on CUDA
    layers = [m for m in model.modules() if isinstance(m, SparseInt8Linear)]
    assert layers and all(m.pattern == "2:4" and m.act.is_static and m.weight_values.is_cuda for m in layers)
    with torch.no_grad():
        real = model(input_ids=ids).logits
    assert ((real - fake).abs().max() / fake.abs().max()).item() < 1e-4
