"""KD losses against hand computations; teacher/student checks."""
import math

import pytest
import torch
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
