"""The fast path (sparse_ofa/fastpath/) computes what the plain sparsified model computes, stays
out of the state_dict, follows weight reloads, and `sparse-ofa bench --quick` runs. No timings."""
import copy
import json

import pytest
import torch

from sparse_ofa import magnitude_prune_, sparsify, unpack_int8
from sparse_ofa.fastpath import apply_fastpath, remove_fastpath
from sparse_ofa.fastpath.attention import FastSelfAttentionMixin
from sparse_ofa.fastpath.guards import FastMixin
from sparse_ofa.formats import concat_packed
from sparse_ofa.fastpath.layer import FastLayerMixin
from sparse_ofa.formats import pack
from sparse_ofa.modules import SparseInt8Linear

TINY = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, attn_implementation="sdpa")


def _tiny(arch: str, seed: int = 0):
    from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig,
                              RobertaModel)

    torch.manual_seed(seed)
    if arch == "bert":
        model = BertModel(BertConfig(**TINY), add_pooling_layer=False)
    elif arch == "roberta":
        model = RobertaModel(RobertaConfig(**TINY, pad_token_id=1), add_pooling_layer=False)
    else:
        model = DistilBertModel(DistilBertConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4,
                                                 hidden_dim=128, max_position_embeddings=64,
                                                 attn_implementation="sdpa"))
    model.eval()
    magnitude_prune_(model, 0.7)
    return model


def _inputs(batch: int = 3, seq: int = 11):
    ids = torch.randint(5, 120, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding in one row: the attention mask must reach the fast attention
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hidden(model, inputs):
    with torch.inference_mode():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_fast_path_equals_plain_path(arch):
    fp32 = _tiny(arch)
    plain = sparsify(copy.deepcopy(fp32), fastpath=False)
    fast = sparsify(copy.deepcopy(fp32))
    swapped = [m for m in fast.modules() if isinstance(m, FastSelfAttentionMixin)]
    assert len(swapped) == 2 and not any(isinstance(m, FastSelfAttentionMixin) for m in plain.modules())
    layers = [m for m in fast.modules() if isinstance(m, FastLayerMixin)]
    assert len(layers) == 2
    inputs = _inputs()
    want = _hidden(plain, inputs)
    first = _hidden(fast, inputs)  # the layers' first call checks the lean forward against theirs
    assert all(m.__dict__["_sparse_ofa_layer_mode"] == "tensor" for m in layers)
    second = _hidden(fast, inputs)  # lean layers from here on
    # same int32 products and epilogue; only the attention kernel's reading order may differ
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-5)
    assert set(fast.state_dict()) == set(plain.state_dict())


def test_distilbert_gets_its_own_mixins_and_old_forms_are_left_alone():
    from sparse_ofa.fastpath.attention import FastDistilSelfAttentionMixin, attention_mixin as _attention_mixin
    from sparse_ofa.fastpath.layer import FastDistilLayerMixin

    fast = sparsify(_tiny("distilbert"))
    assert all(type(layer).__mro__[1] is FastDistilLayerMixin for layer in fast.transformer.layer)
    assert all(type(layer.attention).__mro__[1] is FastDistilSelfAttentionMixin for layer in fast.transformer.layer)

    class MultiHeadSelfAttention(torch.nn.Module):  # transformers 4's DistilBERT attention: other arguments
        def __init__(self, attention):
            super().__init__()
            self.__dict__.update({k: v for k, v in vars(attention).items() if not k.startswith("_")})
            self._modules = attention._modules

        def forward(self, query, key, value, mask, head_mask=None, output_attentions=False):
            raise AssertionError("not called")

    old = MultiHeadSelfAttention(_tiny("distilbert").transformer.layer[0].attention)
    assert hasattr(old, "q_lin") and hasattr(old, "n_heads") and _attention_mixin(old) is None


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_attention_that_cannot_run_fast_falls_back_inside_the_lean_layer(arch):
    """With eager attention the fast attention declines and the lean layer calls the attention module:
    DistilBERT's applies its output projection itself, BERT's does not (either applied twice or never
    would be O(1) off); a hook on the attention module sends the layer down the checked path, same
    thing."""
    fp32 = _tiny(arch)
    plain = sparsify(copy.deepcopy(fp32), fastpath=False)
    fast = sparsify(copy.deepcopy(fp32))
    apply_fastpath(fast, attention="sdpa", fuse=False)  # the plain path's numerics, bit for bit
    inputs = _inputs()
    for _ in range(2):
        assert torch.equal(_hidden(fast, inputs), _hidden(plain, inputs))
    layers = [m for m in fast.modules() if isinstance(m, FastLayerMixin)]
    assert [m.__dict__["_sparse_ofa_layer_mode"] for m in layers] == ["tensor", "tensor"]
    plain.config._attn_implementation = fast.config._attn_implementation = "eager"
    assert torch.equal(_hidden(fast, inputs), _hidden(plain, inputs))
    plain.config._attn_implementation = fast.config._attn_implementation = "sdpa"
    attention = layers[0].attention if arch == "distilbert" else layers[0].attention.self
    seen = []
    attention.register_forward_hook(lambda m, args, out: seen.append(out[0].shape))
    assert torch.equal(_hidden(fast, inputs), _hidden(plain, inputs)) and seen == [(3, 11, 64)]


def test_fused_weight_follows_load_state_dict():
    inputs = _inputs()
    fast = sparsify(_tiny("bert", seed=0))
    _hidden(fast, inputs)  # builds the fused QKV from seed-0 weights
    other = sparsify(_tiny("bert", seed=1), fastpath=False)
    fast.load_state_dict(other.state_dict())
    # (fused GELU / LayerNorm within ~1e-6 of torch's; the next layer's int8 quantization can turn that
    # into one activation step, ~1e-4 here. Stale fused weights would differ by O(1).)
    torch.testing.assert_close(_hidden(fast, inputs), _hidden(other, inputs), rtol=1e-3, atol=1e-3)


def test_fused_weight_follows_set_backend():
    fast = sparsify(_tiny("bert"))
    inputs = _inputs()
    before = _hidden(fast, inputs)
    for module in fast.modules():
        if isinstance(module, SparseInt8Linear):
            module.set_backend("reference")
    fused = [m.__dict__["_sparse_ofa_qkv"][1] for m in fast.modules() if isinstance(m, FastSelfAttentionMixin)]
    after = _hidden(fast, inputs)
    fused_now = [m.__dict__["_sparse_ofa_qkv"][1] for m in fast.modules()
                 if isinstance(m, FastSelfAttentionMixin)]
    assert all(f.backend == "reference" for f in fused_now) and fused_now[0] is not fused[0]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_training_mode_and_remove_use_the_model_forward():
    fp32 = _tiny("bert")
    fast = sparsify(copy.deepcopy(fp32))
    plain = sparsify(copy.deepcopy(fp32), fastpath=False)
    inputs = _inputs()
    fast.train(), plain.train()
    torch.manual_seed(3)
    a = fast(**inputs).last_hidden_state
    torch.manual_seed(3)
    b = plain(**inputs).last_hidden_state
    torch.testing.assert_close(a, b)  # same dropout draws only if the same code path ran
    assert remove_fastpath(fast) == 6  # 2 attentions + 2 layers + the embeddings + the model
    assert not any(isinstance(m, FastMixin) for m in fast.modules())
    assert type(fast.encoder.layer[0]).__name__ == "BertLayer"


def test_bf16_attention_is_close_and_opt_in():
    fp32 = _tiny("bert")
    plain = sparsify(copy.deepcopy(fp32), fastpath=False)
    fast = sparsify(copy.deepcopy(fp32))
    assert apply_fastpath(fast, attention="bf16") == ["encoder.layer.0.attention.self",
                                                      "encoder.layer.1.attention.self"]  # layers already fast
    padded = _inputs(seq=40)  # from 32 keys on, CPUs with AVX-512 BF16 run the bf16 kernel
    unpadded = {"input_ids": padded["input_ids"], "attention_mask": torch.ones_like(padded["input_ids"])}
    for inputs in (padded, unpadded):  # with an additive mask, and with none (all tokens real)
        want, got = _hidden(plain, inputs), _hidden(fast, inputs)
        assert not torch.equal(want, got)  # it really ran a different attention
        cos = torch.nn.functional.cosine_similarity(want.flatten(1), got.flatten(1)).min()
        assert cos > 0.999
    with pytest.raises(ValueError, match="attention must be one of"):
        apply_fastpath(fast, attention="int4")


def test_concat_packed_is_the_stacked_weight():
    weights = [torch.randn(n, 16) * (torch.rand(n, 16) > 0.6) for n in (5, 3, 7)]
    parts = [pack(w, "unstructured") for w in weights]
    fused = concat_packed(parts).validate()
    assert fused.shape == (15, 16)
    assert torch.equal(unpack_int8(fused), torch.cat([unpack_int8(p) for p in parts]))
    assert torch.equal(fused.scale, torch.cat([p.scale for p in parts]))
    with pytest.raises(ValueError, match="same in_features"):
        concat_packed([parts[0], pack(torch.randn(4, 8))])


def test_bench_command_quick_mode(tmp_path):
    from sparse_ofa.cli import main

    assert main(["bench", "--quick", "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    impls = {r["extra_info"]["impl"] for r in rows}
    assert {"fp32_linear", "int_mm", "quantize_dynamic", "fp32_model"} <= impls
    assert any(i.startswith("sparse_ofa:") for i in impls)
    assert all(r["median"] > 0 for r in rows)
    table = (tmp_path / "speedup.md").read_text()
    assert "x int_mm" in table and "sparse_ofa:" in table
    e2e = [r for r in rows if r["extra_info"]["kind"] == "e2e" and r["extra_info"]["impl"].startswith("sparse_ofa")]
    assert {r["extra_info"]["pattern"] for r in e2e} == {"unstructured", "1x4"}
    assert all(r["extra_info"]["cosine_vs_fp32"] > 0.99 for r in e2e)
    assert (tmp_path / "speedup_vs_sparsity.png").stat().st_size > 1000


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_whole_model_pickle_round_trip_in_a_fresh_process(tmp_path, arch):
    import subprocess
    import sys

    fast = sparsify(_tiny(arch))
    inputs = _inputs()
    want = _hidden(fast, inputs)  # builds the fused cache, which must not be pickled
    torch.save({"model": fast, "inputs": inputs, "want": want}, tmp_path / "m.pt")
    check = (
        "import torch, sys\n"
        "from sparse_ofa.fastpath.attention import FastSelfAttentionMixin\n"
        f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
        "m = d['model']\n"
        "attn = [x for x in m.modules() if isinstance(x, FastSelfAttentionMixin)]\n"
        "assert len(attn) == 2 and all('_sparse_ofa_qkv' not in a.__dict__ for a in attn)\n"
        "with torch.inference_mode(): got = m(**d['inputs']).last_hidden_state\n"
        "torch.testing.assert_close(got, d['want'])\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_from_pretrained_gets_the_fast_path(tmp_path):
    from sparse_ofa import from_pretrained, save_pretrained

    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**TINY)).eval()  # with its pooler, as AutoModel rebuilds it
    magnitude_prune_(model, 0.7)
    fast = sparsify(model)
    save_pretrained(fast, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert sum(isinstance(m, FastMixin) for m in loaded.modules()) == 6  # 2 attentions, 2 layers, embeddings, model
    inputs = _inputs()
    torch.testing.assert_close(_hidden(loaded, inputs), _hidden(fast, inputs))


def test_lean_layer_turns_itself_off_when_the_model_forward_differs():
    from transformers.models.bert.modeling_bert import BertLayer

    class DoubledLayer(BertLayer):  # a user's subclass that does more than the standard layer
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * 2

    fp32 = _tiny("bert")
    for layer in fp32.encoder.layer:
        layer.__class__ = DoubledLayer
    plain = sparsify(copy.deepcopy(fp32), fastpath=False)
    fast = sparsify(copy.deepcopy(fp32))
    inputs = _inputs()
    want = _hidden(plain, inputs)
    for _ in range(2):  # the first call checks, the second runs whatever the check decided
        torch.testing.assert_close(_hidden(fast, inputs), want, rtol=1e-5, atol=1e-5)
    modes = [m.__dict__.get("_sparse_ofa_layer_mode") for m in fast.modules() if isinstance(m, FastLayerMixin)]
    assert modes == ["off", "off"]


def test_backend_without_fused_post_ops_composes_torch_ops():
    """A backend with no one-op linear (reference here; triton/cuda on GPUs) runs direct() as its own
    linear followed by torch's add / gelu / layer_norm: with torch's SDPA that is the plain path, bit
    for bit, even with fuse=True."""
    fp32 = _tiny("bert")
    plain = sparsify(copy.deepcopy(fp32), backend="reference", fastpath=False)
    fast = sparsify(copy.deepcopy(fp32), backend="reference")
    apply_fastpath(fast, attention="sdpa")
    inputs = _inputs()
    want = _hidden(plain, inputs)
    _hidden(fast, inputs)  # first call: the layers' self-check
    assert torch.equal(_hidden(fast, inputs), want)
    linears = [m for m in fast.modules() if isinstance(m, SparseInt8Linear)]
    assert any(key[-1] != (False, False, False) for m in linears for key in m._plans)  # post-ops were asked


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_lean_layer_notices_hooks_replacements_and_fuse_after_its_first_calls(arch):
    """The lean layer resolves what it calls once (a cached route): a hook registered later, a module
    replaced later, or fuse switched later must still take effect on the next call."""
    fast = sparsify(_tiny(arch))
    inputs = _inputs()
    _hidden(fast, inputs)
    base = _hidden(fast, inputs)  # the route is cached now
    layer = fast.transformer.layer[0] if arch == "distilbert" else fast.encoder.layer[0]
    ffn_in, out_norm_parent, out_norm_name = ((layer.ffn.lin1, layer, "output_layer_norm") if arch == "distilbert"
                                              else (layer.intermediate.dense, layer.output, "LayerNorm"))
    assert layer.__dict__.get("_sparse_ofa_route") is not None
    seen = []
    handle = ffn_in.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    # the hook ran, same output up to the unfused GELU (torch's, not the kernel's: ~1e-6, which a
    # re-quantization downstream can turn into one int8 step, ~1e-4)
    torch.testing.assert_close(_hidden(fast, inputs), base, rtol=1e-3, atol=1e-3)
    assert seen == [(3, 11, 128)]
    handle.remove()
    doubled = getattr(out_norm_parent, out_norm_name)

    class Doubled(torch.nn.Module):
        def forward(self, x):
            return doubled(x) * 2

    setattr(out_norm_parent, out_norm_name, Doubled())  # a replaced leaf module is called, not the cached one
    changed = _hidden(fast, inputs)
    assert not torch.allclose(changed, base)
    setattr(out_norm_parent, out_norm_name, doubled)
    assert torch.equal(_hidden(fast, inputs), base)
    apply_fastpath(fast, attention="sdpa", fuse=False)  # options switched later are followed too
    plain = sparsify(_tiny(arch), fastpath=False)
    assert torch.equal(_hidden(fast, inputs), _hidden(plain, inputs))


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_lean_embeddings_equal_the_model_forward_or_step_aside(arch):
    """BERT's, RoBERTa's (padding-aware positions) and DistilBERT's embeddings take the lean forward and
    give the same bits, padding tokens included; hooks, inputs_embeds, explicit position ids and
    training run the model's own forward."""
    from sparse_ofa.fastpath.embeddings import FastDistilEmbeddingsMixin

    fp32 = _tiny(arch)
    fast, plain = sparsify(copy.deepcopy(fp32)), sparsify(copy.deepcopy(fp32), fastpath=False)
    emb, own = fast.embeddings, plain.embeddings
    assert isinstance(emb, FastDistilEmbeddingsMixin) == (arch == "distilbert")
    ids = torch.randint(5, 120, (2, 9))
    ids[1, 6:] = emb.word_embeddings.padding_idx or 0  # padding tokens (RoBERTa's positions skip them)
    types = torch.randint(0, 2, (2, 9))
    with torch.inference_mode():
        for _ in range(2):  # the first call checks, the second runs what the check decided
            # (DistilBERT has no token types; its model calls embeddings(input_ids) positionally)
            calls = ([((ids,), {})] if arch == "distilbert"
                     else [((), {"input_ids": ids}), ((), {"input_ids": ids, "token_type_ids": types})])
            for args, kwargs in calls:
                assert torch.equal(emb(*args, **kwargs), own(*args, **kwargs))
    assert emb.__dict__["_sparse_ofa_embed_mode"] == "on"
    seen = []
    handle = emb.word_embeddings.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.inference_mode():
        assert torch.equal(emb(input_ids=ids), own(input_ids=ids)) and seen == [(2, 9, 64)]
        handle.remove()
        vectors = torch.randn(2, 9, 64)
        import inspect  # (transformers 5.0's DistilBERT embeddings spell it input_embeds)

        embeds = "input_embeds" if "input_embeds" in inspect.signature(own.forward).parameters else "inputs_embeds"
        assert torch.equal(emb(input_ids=None, **{embeds: vectors}), own(input_ids=None, **{embeds: vectors}))
        positions = torch.arange(9).flip(0).expand(2, 9)
        assert torch.equal(emb(input_ids=ids, position_ids=positions), own(input_ids=ids, position_ids=positions))
    emb.train(), own.train()
    torch.manual_seed(1)
    a = emb(input_ids=ids)
    torch.manual_seed(1)
    assert torch.equal(a, own(input_ids=ids))  # same dropout draws: the model's own forward ran


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_lean_model_forward_equals_the_model_forward_or_steps_aside(arch, monkeypatch):
    """The base model's lean forward (embeddings, mask, lean layers, pooler) gives the model's own
    output object with the same values as the model's own forward (same layers underneath: same
    bits), and steps aside for options that change the output, extra inputs, hooks and training."""
    from transformers import (BertConfig, BertForSequenceClassification, BertModel,
                              DistilBertForSequenceClassification, RobertaConfig, RobertaModel)

    from sparse_ofa.fastpath.model import FastModelMixin

    torch.manual_seed(0)
    if arch == "bert":
        fp32 = BertModel(BertConfig(**TINY)).eval()  # with its pooler
    elif arch == "roberta":
        fp32 = RobertaModel(RobertaConfig(**TINY, pad_token_id=1)).eval()
    else:
        fp32 = _tiny("distilbert")  # (no pooler)
    magnitude_prune_(fp32, 0.7)
    fast, plain = sparsify(copy.deepcopy(fp32)), sparsify(copy.deepcopy(fp32), fastpath=False)
    assert isinstance(fast, FastModelMixin) and not isinstance(plain, FastModelMixin)
    encoder = fast.transformer if arch == "distilbert" else fast.encoder
    outputs = {"last_hidden_state"} if arch == "distilbert" else {"last_hidden_state", "pooler_output"}
    encoder_calls = []
    encoder_cls = type(encoder)
    own_encoder = encoder_cls.forward
    monkeypatch.setattr(encoder_cls, "forward", lambda self, *a, **k: encoder_calls.append(1) or own_encoder(self, *a, **k))

    def own(**kwargs):  # the fast model through the model's own forward (same layers underneath)
        mode = fast.__dict__["_sparse_ofa_model_mode"]
        fast.__dict__["_sparse_ofa_model_mode"] = "off"
        try:
            return fast(**kwargs)
        finally:
            fast.__dict__["_sparse_ofa_model_mode"] = mode

    inputs = _inputs()
    with torch.inference_mode():
        plain_out = plain(**inputs)
        for call in range(3):  # the first call checks (and runs the model's own forward too)
            encoder_calls.clear()
            got = fast(**inputs)
            # lean from the second call on; the first runs the model's own forward twice: once for the
            # layers' own first-call checks, once with the layers as they will run (to compare with)
            assert len(encoder_calls) == (2 if call == 0 else 0)
            want = own(**inputs)
            assert type(got) is type(want) and set(got.keys()) == set(want.keys()) == outputs
            if call:  # (the first call returns what the layers' own first-call checks return)
                for key in outputs:
                    assert torch.equal(got[key], want[key])
            # against the plain path: the fused post-ops' ~1e-6 can move an int8 step (bench/NOTES.md)
            torch.testing.assert_close(got.last_hidden_state, plain_out.last_hidden_state, rtol=1e-3, atol=1e-3)
        assert fast.__dict__["_sparse_ofa_model_mode"] is type(want)
        types = torch.randint(0, 2, inputs["input_ids"].shape) if arch == "bert" else None
        for extra, lean in (({"output_attentions": False, "return_dict": True}
                             | ({} if arch == "distilbert" else {"token_type_ids": types}), True),
                            ({"output_hidden_states": True}, False), ({"return_dict": False}, False),
                            ({"position_ids": torch.arange(11).expand(3, 11)}, False)):
            encoder_calls.clear()
            got = fast(**inputs, **extra)
            assert len(encoder_calls) == (0 if lean else 1), extra
            want = own(**inputs, **extra)
            assert type(got) is type(want), extra
            assert torch.equal(got[0], want[0]), extra
            if extra.get("output_hidden_states"):
                assert len(got.hidden_states) == 3
        seen = []
        handle = fast.register_forward_hook(lambda m, args, out: seen.append(1))
        encoder_calls.clear()
        fast(**inputs)
        handle.remove()
        assert seen == [1] and encoder_calls == []  # a hook on the model itself runs around either forward
        handle = encoder.register_forward_pre_hook(lambda m, args: seen.append(2))
        fast(**inputs)
        handle.remove()
        assert seen == [1, 2]  # a hook on the encoder: the model's own forward, which calls it
        handle = encoder.layer[1].register_forward_hook(lambda m, args, out: seen.append(3))
        encoder_calls.clear()
        got = fast(**inputs)
        handle.remove()
        assert seen == [1, 2, 3] and encoder_calls == []  # a hooked layer: called as a module, lean otherwise
        assert torch.equal(got.last_hidden_state, own(**inputs).last_hidden_state)
    fast.train()
    encoder_calls.clear()
    fast(**inputs)
    assert encoder_calls == [1]  # training: the model's own forward (dropout and all)
    if arch != "roberta":  # inside a task model
        torch.manual_seed(0)
        head = (BertForSequenceClassification(BertConfig(**TINY)) if arch == "bert"
                else DistilBertForSequenceClassification(_tiny("distilbert").config)).eval()
        magnitude_prune_(head, 0.7)
        fast_head, plain_head = sparsify(copy.deepcopy(head)), sparsify(copy.deepcopy(head), fastpath=False)
        with torch.inference_mode():
            for _ in range(2):
                torch.testing.assert_close(fast_head(**inputs).logits, plain_head(**inputs).logits,
                                           rtol=1e-3, atol=1e-3)
        base = fast_head.bert if arch == "bert" else fast_head.distilbert
        assert base.__dict__["_sparse_ofa_model_mode"] not in (None, "off")


def test_first_call_with_autograd_on_raises_no_warning():
    """Eval mode without no_grad/inference_mode (common in user code): the first-call self-checks
    compare detached tensors, so torch warns about nothing."""
    import warnings

    fast = sparsify(_tiny("distilbert"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            fast(**_inputs()).last_hidden_state.sum()


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_concurrent_inference_from_python_threads(arch):
    """A server's thread pool calling one model at once, first calls (self-checks, plan and route
    caches) included: every call gets its own input's answer (kernel scratch is per thread)."""
    import threading

    fast, serial = sparsify(_tiny(arch)), sparsify(_tiny(arch))
    inputs = [_inputs(batch=b, seq=s) for b, s in ((3, 5), (3, 40), (3, 11), (4, 33))]
    for _ in range(2):
        want = [_hidden(serial, i) for i in inputs]
    errors = []

    def work(k):
        try:
            for rep in range(6):
                i = (k + rep) % len(inputs)
                got = _hidden(fast, inputs[i])
                if not torch.allclose(got, want[i], rtol=1e-3, atol=1e-3):
                    errors.append((k, rep, i, float((got - want[i]).abs().max())))
        except Exception as exc:  # noqa: BLE001 - reported below with the thread that raised it
            errors.append((k, repr(exc)))

    workers = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors[:5]
