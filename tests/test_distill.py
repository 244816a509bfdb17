"""KD losses against hand computations; teacher/student checks; the hidden-state distillation of
sentence encoders (pooled cosine + per-layer MSE, the teacher cache, bf16, teacher forcing)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from sparse_ofa.training.distill import DistillLoss, check_teacher_student, embedding_distill_loss, kd_kl


def by_hand_kl(s, t, T):
    """T^2 * sum_c p_t (log p_t - log p_s) for one position, in plain Python."""
    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]
    ps, pt = softmax(s), softmax(t)
    return T * T * sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))


def test_kd_kl_matches_hand_computation_with_padding_mask():
    s = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [9.0, -9.0, 0.0]]])
    t = torch.tensor([[[2.0, 1.0, 0.0], [1.0, 0.5, 0.5], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    expected = (by_hand_kl(s[0, 0].tolist(), t[0, 0].tolist(), 2.0)
                + by_hand_kl(s[0, 1].tolist(), t[0, 1].tolist(), 2.0)) / 2
    assert float(kd_kl(s, t, 2.0, mask)) == pytest.approx(expected, rel=1e-5)
    all_three = sum(by_hand_kl(s[0, i].tolist(), t[0, i].tolist(), 2.0) for i in range(3)) / 3
    assert float(kd_kl(s, t, 2.0)) == pytest.approx(all_three, rel=1e-5)
    assert float(kd_kl(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_kd_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        kd_kl(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="mask shape"):
        kd_kl(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), mask=torch.ones(2, 4))


def test_distill_loss_mlm_plus_nsp_by_hand():
    mlm_s, mlm_t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    nsp_s, nsp_t = torch.randn(2, 2), torch.randn(2, 2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    hard = torch.tensor(3.0)
    student = {"prediction_logits": mlm_s, "seq_relationship_logits": nsp_s, "loss": hard}
    teacher = {"prediction_logits": mlm_t, "seq_relationship_logits": nsp_t}
    kept = [(b, i) for b in range(2) for i in range(4) if mask[b, i]]
    mlm = sum(by_hand_kl(mlm_s[b, i].tolist(), mlm_t[b, i].tolist(), 2.0) for b, i in kept) / len(kept)
    nsp = sum(by_hand_kl(nsp_s[b].tolist(), nsp_t[b].tolist(), 2.0) for b in range(2)) / 2
    loss_fn = DistillLoss()
    total = loss_fn(student, teacher, None, mask)
    assert float(total) == pytest.approx(0.5 * 3.0 + 0.5 * (mlm + nsp), rel=1e-5)
    assert loss_fn.last["hard"] == pytest.approx(3.0)


def test_distill_loss_span_heads_are_averaged():
    s = QuestionAnsweringModelOutput(start_logits=torch.randn(3, 6), end_logits=torch.randn(3, 6))
    t = QuestionAnsweringModelOutput(start_logits=torch.randn(3, 6), end_logits=torch.randn(3, 6))
    soft = (kd_kl(s.start_logits, t.start_logits) + kd_kl(s.end_logits, t.end_logits)) / 2
    total = DistillLoss(w_hard=0.0, w_soft=1.0)(s, t)
    assert float(total) == pytest.approx(float(soft), rel=1e-6)
    with pytest.raises(ValueError, match="no hard loss"):
        DistillLoss()(s, t)


def test_embedding_loss_cosine_and_mse_by_hand():
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled_s = torch.stack([s[0, :2].mean(0), s[1, :1].mean(0)])
    pooled_t = torch.stack([t[0, :2].mean(0), t[1, :1].mean(0)])
    cos = torch.nn.functional.cosine_similarity(pooled_s, pooled_t, dim=-1)
    assert float(embedding_distill_loss(s, t, mask)) == pytest.approx(float((1 - cos).mean()), rel=1e-5)
    mse = ((pooled_s - pooled_t) ** 2).mean()
    assert float(embedding_distill_loss(s, t, mask, kind="mse")) == pytest.approx(float(mse), rel=1e-5)
    tokens = ((s[0, 0] - t[0, 0]) ** 2).mean() + ((s[0, 1] - t[0, 1]) ** 2).mean() + ((s[1, 0] - t[1, 0]) ** 2).mean()
    got = embedding_distill_loss(s, t, mask, kind="mse", pooled=False)
    assert float(got) == pytest.approx(float(tokens / 3), rel=1e-5)
    with pytest.raises(ValueError, match="kind"):
        embedding_distill_loss(s, t, mask, kind="l1")


def test_encoder_only_models_distill_embeddings_and_get_gradients():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)
    teacher, student = BertModel(cfg).eval(), BertModel(cfg)
    ids, mask = torch.randint(0, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask)
    s_out = student(input_ids=ids, attention_mask=mask)
    loss = DistillLoss(w_hard=0.0, w_soft=1.0)(s_out, t_out, mask=mask)
    expected = embedding_distill_loss(s_out.last_hidden_state, t_out.last_hidden_state, mask)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert student.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0


def test_check_teacher_student():
    base = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    teacher = BertForMaskedLM(BertConfig(vocab_size=50, **base))
    check_teacher_student(teacher, BertForMaskedLM(BertConfig(vocab_size=50, **base)))
    with pytest.raises(ValueError, match="vocabulary size 50 .teacher. vs 60"):
        check_teacher_student(teacher, BertForMaskedLM(BertConfig(vocab_size=60, **base)))
    with pytest.raises(ValueError, match="head"):
        check_teacher_student(teacher, BertForSequenceClassification(BertConfig(vocab_size=50, **base)))
    deeper = dict(base, num_hidden_layers=2)
    with pytest.raises(ValueError, match="layers"):
        check_teacher_student(teacher, BertForMaskedLM(BertConfig(vocab_size=50, **deeper)))
    check_teacher_student(teacher, BertForMaskedLM(BertConfig(vocab_size=50, **deeper)), same_architecture=False)


# ---------------------------------------------------------------------- hidden-state distillation
def _tiny_encoder(vocab_size=30522):
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64), add_pooling_layer=False).eval()


def test_hidden_state_loss_is_pooled_cosine_plus_normalised_layer_mse():
    from sparse_ofa.models.minilm import mean_pool
    from sparse_ofa.training.distill import hidden_state_distill_loss

    teacher = _tiny_encoder(vocab_size=50)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.encoder.layer[1].output.dense.weight.mul_(0.5)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    parts = {}
    got = hidden_state_distill_loss(s, t, mask, 2.0, parts)
    cos = F.cosine_similarity(mean_pool(s.last_hidden_state, mask), mean_pool(t.last_hidden_state, mask), dim=-1)
    keep = mask.bool()
    layer_terms = [((a[keep] - b[keep]) ** 2).mean() / (b[keep] ** 2).mean()
                   for a, b in zip(s.hidden_states[1:], t.hidden_states[1:])]
    want = (1 - cos).mean() + 2.0 * torch.stack(layer_terms).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert parts["cosine"] == pytest.approx(cos.mean().item(), rel=1e-5)
    assert layer_terms[0].item() == 0.0 < layer_terms[1].item()  # only layer 2 was changed


def test_bf16_distillation_keeps_fp32_weights_and_float_loss():
    from sparse_ofa.training.distill import HiddenStateDistillation

    teacher = _tiny_encoder(vocab_size=50)
    student = copy.deepcopy(teacher)
    ids = torch.randint(0, 50, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    seen = []
    student.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss_fn = HiddenStateDistillation(1.0, bf16=True)
    loss = loss_fn(student, teacher, batch)
    assert seen == [torch.bfloat16]  # autocast really ran the linears in bf16
    assert loss.dtype == torch.float32 and loss.item() < 1e-2  # identical models: ~0 up to bf16 noise
    assert loss_fn.last["cosine"] > 0.99
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in student.encoder.parameters())


def test_teacher_cache_gives_the_teachers_hidden_states_and_the_same_loss():
    from sparse_ofa.models.minilm import load_minilm
    from sparse_ofa.training.distill import HiddenStateDistillation, TeacherCache

    tokenizer = load_minilm()[1]
    teacher = _tiny_encoder()
    sentences = ["A short one.", "This sentence is quite a bit longer than the first one is.",
                 "Truncated: " + "word " * 40, "Medium length sentence here."]
    cache = TeacherCache(teacher, tokenizer, sentences, max_length=24, bf16=False, batch_size=3)
    batch = tokenizer(sentences[1:], padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        want = teacher(**batch, output_hidden_states=True).hidden_states
    got = cache.outputs(sentences[1:], batch["input_ids"].shape[1])
    assert len(got.hidden_states) == len(want) == 3 and got.last_hidden_state is got.hidden_states[-1]
    keep = batch["attention_mask"].bool()
    for g, w in zip(got.hidden_states, want):
        assert g.shape == w.shape and g.dtype == torch.float32
        torch.testing.assert_close(g[keep], w[keep], rtol=1e-5, atol=1e-5)
        assert not g[~keep].any()  # padding is zeros, which every loss masks out

    # the loss from the cache is the loss from the teacher's forward
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        weight = student.encoder.layer[0].output.dense.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    cached = HiddenStateDistillation(1.0, teacher_cache=cache)(student, None, {**batch, "sentences": sentences[1:]})
    live = HiddenStateDistillation(1.0)(student, teacher, dict(batch))
    assert cached.item() == pytest.approx(live.item(), rel=1e-4) and live.item() > 1e-3
    with pytest.raises(ValueError, match="teacher's forward"):
        HiddenStateDistillation(1.0, layerwise_weight=1.0, teacher_cache=cache)


def test_layerwise_loss_runs_each_student_layer_on_the_teachers_input():
    from sparse_ofa.training.distill import HiddenStateDistillation

    teacher = _tiny_encoder(vocab_size=50)
    student = copy.deepcopy(teacher)
    ids = torch.randint(0, 50, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plain = HiddenStateDistillation(0.0)(student, teacher, batch)
    forced = HiddenStateDistillation(0.0, layerwise_weight=1.0)
    assert forced(student, teacher, batch).item() == pytest.approx(plain.item(), abs=1e-6)  # same models: 0 extra
    with torch.no_grad():
        student.encoder.layer[0].output.dense.weight.mul_(0.5)
    total = forced(student, teacher, batch)
    assert total.item() > HiddenStateDistillation(0.0)(student, teacher, batch).item()
    forced.remove_hooks()
    assert all(not layer._forward_pre_hooks for layer in teacher.encoder.layer)
