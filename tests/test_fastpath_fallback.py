"""The fast path never fails a forward that the model's own forward runs: a lean forward that raises
or disagrees with the model's own output turns itself off for good with one FastPathWarning naming
the module and the transformers version; a bad input still raises the model's own error. Also:
sparsify() and forwards under torch.inference_mode / no_grad, and the repository root's kernels/
folder does not shadow the PyPI package `kernels`."""
import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sparse_ofa.fastpath.embeddings as fastpath_embed
import sparse_ofa.fastpath.layer as fastpath_layer
import sparse_ofa.fastpath.model as fastpath_model
from sparse_ofa import magnitude_prune_, sparsify
from sparse_ofa.fastpath import FastPathWarning
from sparse_ofa.fastpath.attention import FastSelfAttentionMixin
from sparse_ofa.fastpath.embeddings import FastEmbeddingsMixin
from sparse_ofa.fastpath.layer import FastLayerMixin
from sparse_ofa.fastpath.model import FastModelMixin, encoder_mask

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, attn_implementation="sdpa")


def _pair(arch: str = "bert"):
    """(fast, plain) sparsified copies of one tiny 70 %-pruned model with a pooler."""
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    if arch == "bert":
        fp32 = BertModel(BertConfig(**TINY)).eval()
    else:
        fp32 = DistilBertModel(DistilBertConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                max_position_embeddings=64, attn_implementation="sdpa")).eval()
    magnitude_prune_(fp32, 0.7)
    return sparsify(copy.deepcopy(fp32)), sparsify(copy.deepcopy(fp32), fastpath=False)


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(5, 120, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(model, inputs, times=1):
    with torch.inference_mode():
        for _ in range(times):
            out = model(**inputs)
    return out.last_hidden_state


def _modes(model, key):
    return [m.__dict__.get(key) for m in model.modules() if key in m.__dict__]


def _fast_path_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, FastPathWarning)]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_lean_model_that_raises_at_its_first_call_falls_back_for_good_with_one_warning(arch, monkeypatch):
    """A changed private signature looks like this: the lean forward raises a TypeError."""
    fast, plain = _pair(arch)

    def changed_signature(attention_mask):
        raise TypeError("encoder_mask() missing 1 required positional argument: 'position_ids'")
    monkeypatch.setattr(fastpath_model, "encoder_mask", changed_signature)
    inputs = _inputs()
    want = _run(plain, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(_run(fast, inputs), want, rtol=1e-3, atol=1e-3)
    assert _modes(fast, "_sparse_ofa_model_mode") == ["off"]
    messages = _fast_path_warnings(caught)
    assert len(messages) == 1, messages  # off for good: it is not tried (nor reported) again
    from sparse_ofa.fastpath.guards import base_class

    assert f"{base_class(fast).__name__} runs its own forward" in messages[0]  # the model's own class
    assert f"transformers {_transformers_version()}" in messages[0] and "position_ids" in messages[0]


def test_lean_layer_that_raises_after_working_falls_back_and_says_so(monkeypatch):
    fast, plain = _pair()
    inputs = _inputs()
    want = _run(plain, inputs)
    torch.testing.assert_close(_run(fast, inputs, times=2), want, rtol=1e-3, atol=1e-3)
    assert _modes(fast, "_sparse_ofa_layer_mode") == ["tensor", "tensor"]
    # the model's lean forward calls the lean layers directly: take it out of the way so the layers
    # are called as modules, then make their lean forward fail as a changed module layout would
    fast.__dict__["_sparse_ofa_model_mode"] = "off"

    def changed_layout(layer, *args, **kwargs):
        raise AttributeError("'BertLayer' object has no attribute 'intermediate'")
    monkeypatch.setattr(fastpath_layer, "_lean_forward", changed_layout)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(_run(fast, inputs, times=2), want, rtol=1e-3, atol=1e-3)
    assert _modes(fast, "_sparse_ofa_layer_mode") == ["off", "off"]
    messages = _fast_path_warnings(caught)
    assert len(messages) == 2 and all("BertLayer" in m and "no attribute 'intermediate'" in m for m in messages)


def test_lean_embeddings_and_attention_fall_back_too(monkeypatch):
    fast, plain = _pair()
    inputs = _inputs()
    want = _run(plain, inputs)

    def broken(*args, **kwargs):
        raise RuntimeError("layout changed")
    monkeypatch.setattr(fastpath_embed, "_lean_embeddings", broken)
    monkeypatch.setattr(FastSelfAttentionMixin, "fast_attention", broken)
    fast.__dict__["_sparse_ofa_model_mode"] = "off"  # modules called as modules, one by one
    for layer in fast.encoder.layer:
        layer.__dict__["_sparse_ofa_layer_mode"] = "off"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(_run(fast, inputs, times=2), want, rtol=1e-3, atol=1e-3)
    assert _modes(fast, "_sparse_ofa_embed_mode") == ["off"]
    assert _modes(fast, "_sparse_ofa_attention_mode") == ["off", "off"]
    assert len(_fast_path_warnings(caught)) == 3, _fast_path_warnings(caught)


def test_first_call_mismatch_is_reported(monkeypatch):
    fast, plain = _pair()
    own_lean = fastpath_model._lean_model
    monkeypatch.setattr(fastpath_model, "_lean_model", lambda *a: (own_lean(*a)[0] * 2, own_lean(*a)[1]))
    with pytest.warns(FastPathWarning, match="did not match the model's own output"):
        _run(fast, _inputs())
    assert _modes(fast, "_sparse_ofa_model_mode") == ["off"]


def test_a_bad_input_raises_the_models_own_error_and_keeps_the_fast_path():
    fast, _ = _pair()
    inputs = _inputs()
    _run(fast, inputs, times=2)
    assert isinstance(fast.__dict__["_sparse_ofa_model_mode"], type)
    bad = dict(inputs, input_ids=inputs["input_ids"].clone().fill_(500))  # beyond the vocabulary
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        with pytest.raises(IndexError):
            _run(fast, bad)
    assert isinstance(fast.__dict__["_sparse_ofa_model_mode"], type)  # still on
    assert _modes(fast, "_sparse_ofa_layer_mode") == ["tensor", "tensor"]


def test_fast_path_does_not_call_transformers_private_mask_builders(monkeypatch):
    """What transformers 5.25 did to 5.24's forward: a private helper's signature changed. The lean
    model builds its own mask, so such a change does not matter to it."""
    from transformers.models.bert.modeling_bert import BertModel

    def changed(*args, **kwargs):
        raise TypeError("changed private signature")
    for name in ("_create_attention_masks", "get_extended_attention_mask"):
        if hasattr(BertModel, name):
            monkeypatch.setattr(BertModel, name, changed, raising=False)
    fast, _ = _pair()
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    # as if checked already: the lean forward alone runs (the model's own one would call the patched helpers)
    fast.__dict__["_sparse_ofa_model_mode"] = BaseModelOutputWithPoolingAndCrossAttentions
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        out = _run(fast, _inputs())
    assert out.shape == (3, 11, 64) and torch.isfinite(out).all()


def test_encoder_mask():
    assert encoder_mask(None) is None
    assert encoder_mask(torch.ones(2, 5, dtype=torch.long)) is None
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = encoder_mask(mask)
    assert got.dtype == torch.bool and got.shape == (2, 1, 1, 3)
    assert got[:, 0, 0].tolist() == [[True, True, False], [True, True, True]]
    assert torch.equal(encoder_mask(mask.bool()), got)


@pytest.mark.parametrize("where", ["sparsify_inside", "run_inside", "no_grad"])
def test_sparsify_and_forward_under_inference_mode_and_no_grad(where):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    fp32 = BertModel(BertConfig(**TINY)).eval()
    magnitude_prune_(fp32, 0.7)
    plain = sparsify(copy.deepcopy(fp32), fastpath=False)
    inputs = _inputs()
    want = _run(plain, inputs)
    fast = copy.deepcopy(fp32)
    if where == "sparsify_inside":
        with torch.inference_mode():
            sparsify(fast)
            got = [fast(**inputs).last_hidden_state for _ in range(3)]
        # the packed buffers are ordinary tensors: a state_dict loads into them outside inference mode
        assert not any(b.is_inference() for b in fast.buffers())
        fast.load_state_dict(plain.state_dict())
    elif where == "run_inside":
        sparsify(fast)
        with torch.inference_mode():
            got = [fast(**inputs).last_hidden_state for _ in range(3)]
    else:
        with torch.no_grad():
            sparsify(fast)
            got = [fast(**inputs).last_hidden_state for _ in range(3)]
    for out in got:
        torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
    with torch.no_grad():  # and outside inference mode afterwards
        torch.testing.assert_close(fast(**inputs).last_hidden_state, want, rtol=1e-3, atol=1e-3)
    assert isinstance(fast.__dict__["_sparse_ofa_model_mode"], type)  # the fast path stayed on


def test_repo_root_kernels_folder_does_not_shadow_the_installed_package():
    """Python started in the repository root has kernels/ on its path: `import kernels` must still
    give the PyPI package (transformers imports it), or fail as in a clean environment."""
    code = ("import kernels, os; print(os.path.dirname(os.path.abspath(kernels.__file__)))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=300)
    if result.returncode:
        assert "No module named 'kernels'" in result.stderr, result.stderr
    else:
        assert Path(result.stdout.strip()) != ROOT / "kernels", result.stdout
    # and the package's own Triton kernels stay importable under their installed name
    result = subprocess.run([sys.executable, "-c", "import sparse_ofa.kernels.layouts"], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
