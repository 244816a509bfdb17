"""Static vs dynamic activation quantization per QAT layer (sparse_ofa.outliers) and convert_qat(dynamic=...)."""
import pytest
import torch
from torch import nn

from sparse_ofa import SparseInt8Linear
from sparse_ofa.training.outliers import outlier_layers, static_vs_dynamic_error
from sparse_ofa.training.qat import FakeQuantLinear, QATConfig, convert_qat, prepare_qat
from sparse_ofa.quant import ActQuant


class TwoLayers(nn.Module):
    """x -> a -> b; b's input gets a rare huge outlier through a (one channel of a's output)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        return self.b(self.a(x))


def _observed(seed: int = 0):
    torch.manual_seed(seed)
    model = TwoLayers()
    prepare_qat(model, QATConfig(ema_decay=0.5), filter_fn=lambda m, n: isinstance(m, nn.Linear))
    model.train()
    with torch.no_grad():
        model(x=torch.randn(32, 16))  # both layers observe typical inputs
        for _ in range(8):
            x_out = torch.randn(32, 16)
            x_out[0, 3] = 200.0  # then one outlier per batch at b's input stretches its static range
            model.b(x_out)
    return model


def _batches(n=4):
    out = []
    for _ in range(n):
        x = torch.randn(64, 16)
        out.append({"x": x})
    return out


def test_errors_match_a_hand_computation_and_find_the_stretched_layer():
    model = _observed()
    # b's range was stretched by outliers that the calibration data does not have
    errors = static_vs_dynamic_error(model, _batches())
    assert set(errors) == {"a", "b"}
    x = torch.randn(64, 16)
    got = static_vs_dynamic_error(model, [{"x": x}])["a"]
    scale, zp, qmin, qmax = model.a.act_qparams()
    x_static = (torch.clamp(torch.round(x * (1 / scale.double()).float()) + zp, qmin, qmax) - zp) * scale
    amax = x.abs().amax(-1, keepdim=True)
    x_dyn = torch.clamp(torch.round(x * (amax.reciprocal() * 127)), -127, 127) * (amax / 127)
    want = (float(((x_static - x) ** 2).sum() / (x ** 2).sum()), float(((x_dyn - x) ** 2).sum() / (x ** 2).sum()))
    assert got == pytest.approx(want, rel=1e-4)
    static_b, dynamic_b = errors["b"]
    assert static_b > 20 * dynamic_b and static_b > 0.1  # a uint8 step of a ~200 range swallows N(0, 1) inputs
    assert errors["a"][0] < 1e-2  # a's range fits its inputs: small static error
    assert outlier_layers(errors) == ["b"]
    assert outlier_layers(errors, ratio=1.0, min_error=0.0) == ["a", "b"]  # a's static error is still > its dynamic
    assert outlier_layers({"c": (0.05, 0.03)}) == [] and outlier_layers({"c": (0.05, 0.02)}) == ["c"]
    model.train()  # the calibration runs in eval mode and restores the mode
    static_vs_dynamic_error(model, _batches(1))
    assert model.training and model.a.training


def test_convert_with_dynamic_layers_runs_them_per_token():
    model = _observed()
    x = torch.randn(10, 16)
    convert_qat(model, backend="reference", dynamic=["b"])
    assert isinstance(model.b, SparseInt8Linear) and model.b.act == ActQuant()
    assert model.a.act.is_static
    with torch.no_grad():
        out = model(x)
    # b dynamic: close to the float model's b on a's (static-quantized) output; static b would not be
    ref = _observed()
    with torch.no_grad():
        ref.eval()
        want = nn.functional.linear(model.a(x), ref.b.weight, ref.b.bias)
    assert torch.allclose(out, want, rtol=0.05, atol=0.05)


def test_bad_input_is_named():
    model = _observed()
    with pytest.raises(ValueError, match=r"dynamic names \['c'\] are not FakeQuantLinear layers"):
        convert_qat(model, dynamic=["c"])
    with pytest.raises(ValueError, match="no calibration batches"):
        static_vs_dynamic_error(model, [])
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        static_vs_dynamic_error(TwoLayers(), _batches(1))
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        outlier_layers({}, ratio=0.5)
    with pytest.raises(ValueError, match="min_error must be >= 0"):
        outlier_layers({}, min_error=-1.0)
    fresh = TwoLayers()
    prepare_qat(fresh, QATConfig(), filter_fn=lambda m, n: isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="a has observed no activations"):
        static_vs_dynamic_error(fresh, _batches(1))
