import os

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, BertModel, DistilBertConfig,
                          DistilBertModel, RobertaConfig, RobertaModel)

import sparse_ofa
from sparse_ofa import SparseInt8Linear, load_sparse_state_dict, magnitude_prune_, sparsify, summarize

BERT_ENCODER = {"attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"}
DISTIL_ENCODER = {"attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                  "ffn.lin1", "ffn.lin2"}


def tiny_bert(cls=BertModel, **kw):
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, **kw)
    return cls(cfg).eval()


def tiny_distilbert():
    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64)
    return DistilBertModel(cfg).eval()


def tiny_roberta():
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=70, pad_token_id=1)
    return RobertaModel(cfg).eval()


MODELS = {
    "bert": (tiny_bert, "encoder.layer.", BERT_ENCODER),
    "distilbert": (tiny_distilbert, "transformer.layer.", DISTIL_ENCODER),
    "roberta": (tiny_roberta, "encoder.layer.", BERT_ENCODER),
}


def _inputs():
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("arch", MODELS)
def test_swaps_exactly_the_encoder_linears(arch):
    make, prefix, suffixes = MODELS[arch]
    model = make()
    magnitude_prune_(model, 0.9)
    inputs = _inputs()
    before = _out(model, inputs)
    sparsify(model)
    swapped = {n for n, m in model.named_modules() if isinstance(m, SparseInt8Linear)}
    expect = {f"{prefix}{i}.{s}" for i in range(2) for s in suffixes}
    assert swapped == expect
    remaining = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert not any(n.startswith(prefix) for n in remaining)    # pooler etc. stay nn.Linear
    assert all(isinstance(m, (nn.Embedding, nn.LayerNorm)) or not isinstance(m, SparseInt8Linear)
               for n, m in model.named_modules() if "embeddings" in n or "LayerNorm" in n)
    after = _out(model, inputs)
    cos = torch.nn.functional.cosine_similarity(after.flatten(1), before.flatten(1))
    assert bool((cos > 0.99).all())


def test_heads_pooler_embeddings_untouched():
    model = tiny_bert(BertForSequenceClassification, num_labels=3)
    sparsify(model)
    assert type(model.classifier) is nn.Linear and type(model.bert.pooler.dense) is nn.Linear
    assert isinstance(model.bert.embeddings.word_embeddings, nn.Embedding)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, SparseInt8Linear)


def test_filter_fn_and_errors():
    model = tiny_bert()
    sparsify(model, filter_fn=lambda m, name: name.endswith("intermediate.dense"))
    assert len(summarize(model).rows) == 2
    with pytest.raises(ValueError, match="no Linear layer matched"):
        sparsify(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="only nn.Linear"):
        sparsify(tiny_bert(), filter_fn=lambda m, name: name == "embeddings.word_embeddings")
    with pytest.raises(TypeError, match="SparseInt8Linear.from_linear"):
        sparsify(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify("bert-base-uncased")


def test_nan_weight_names_layer_and_leaves_model_untouched():
    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense: 1 NaN/Inf"):
        sparsify(model)
    assert not any(isinstance(m, SparseInt8Linear) for m in model.modules())


def test_pattern_argument_is_checked():
    model = tiny_bert()
    magnitude_prune_(model, 0.9, "unstructured")
    with pytest.raises(ValueError, match="does not follow the '1x4' pattern"):
        sparsify(model, pattern="1x4")
    model = tiny_bert()
    magnitude_prune_(model, 0.75, "1x4")
    sparsify(model)
    assert {r.pattern for r in summarize(model).rows} == {"1x4"}


def test_report_counts_bytes():
    model = tiny_bert()
    magnitude_prune_(model, 0.9)
    sparsify(model)
    report = summarize(model)
    assert len(report.rows) == 12 and report.sparsity == pytest.approx(0.9, abs=1e-3)
    assert report.dense_bytes == sum(4 * (r.out_features * r.in_features + r.out_features)
                                     for r in report.rows)
    assert report.packed_bytes < report.dense_bytes / 4
    assert "12 layers" in str(report)


@pytest.mark.parametrize("arch", MODELS)
def test_state_dict_round_trip(arch):
    make = MODELS[arch][0]
    model = make()
    magnitude_prune_(model, 0.8)
    sparsify(model)
    state = model.state_dict()
    assert not any(k.endswith(".weight") and "layer." in k and "LayerNorm" not in k
                   and "layer_norm" not in k for k in state), "dense encoder weights saved"
    fresh = make()
    load_sparse_state_dict(fresh, state)
    inputs = _inputs()
    assert torch.equal(_out(fresh, inputs), _out(model, inputs))


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_bert()
    magnitude_prune_(model, 0.9, "1x4")
    sparsify(model)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    fresh = load_sparse_state_dict(tiny_bert(), load_file(tmp_path / "m.safetensors"))
    inputs = _inputs()
    assert torch.equal(_out(fresh, inputs), _out(model, inputs))
    assert fresh.encoder.layer[0].intermediate.dense.pattern == "1x4"


def test_hf_save_pretrained_and_from_pretrained(tmp_path):
    model = tiny_bert(BertForSequenceClassification, num_labels=2)
    magnitude_prune_(model, 0.9)
    sparsify(model)
    model.save_pretrained(tmp_path)
    loaded = sparse_ofa.from_pretrained(tmp_path, BertForSequenceClassification)
    inputs = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    with pytest.raises(FileNotFoundError, match="config.json"):
        sparse_ofa.from_pretrained(tmp_path / "nope")


def test_from_pretrained_rejects_dense_checkpoint(tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no packed sparse_ofa layers"):
        sparse_ofa.from_pretrained(tmp_path)


def test_load_into_wrong_architecture_is_named():
    model = tiny_bert()
    sparsify(model)
    with pytest.raises(ValueError, match="same architecture"):
        load_sparse_state_dict(tiny_distilbert(), model.state_dict())


def test_torch_compile_smoke():
    model = tiny_bert()
    magnitude_prune_(model, 0.9)
    sparsify(model)
    inputs = _inputs()
    compiled = torch.compile(model)
    with torch.no_grad():
        got = compiled(**inputs).last_hidden_state
    assert torch.allclose(got, _out(model, inputs), atol=1e-4, rtol=1e-4)
