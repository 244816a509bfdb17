"""Knowledge distillation losses for Prune OFA (teacher = the dense model, student = its pruned copy).

    total = w_hard * hard + w_soft * soft
    soft  = sum over the logit heads both outputs have of  T^2 * KL(teacher || student at temperature T)

Heads (Hugging Face output fields): `prediction_logits` / `logits` of shape [B, L, V] (MLM) are
averaged over non-padding tokens (the attention mask); `seq_relationship_logits` (NSP) and
classification `logits` [B, C] over the batch; `start_logits` + `end_logits` (SQuAD spans) count as one
head: the mean of the two KLs, as Hugging Face averages the two span losses. Defaults 0.5 / 0.5, T = 2.
For encoder-only models without logits (all-MiniLM-L6-v2 as a BertModel), soft is the sentence-embedding
loss `embedding_distill_loss` on `last_hidden_state`. `hidden_weight > 0` adds that loss on top.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_TOKEN_HEADS = ("prediction_logits", "logits")
_SEQUENCE_HEADS = ("seq_relationship_logits",)
_SPAN_HEADS = ("start_logits", "end_logits")


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over the last dim and averaged
    over the positions where `mask` (shape = logits.shape[:-1]) is true (all positions if None).
    No position selected gives 0 (still attached to the student's graph)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_kl: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; do teacher and student share the vocabulary/labels?")
    if not temperature > 0:
        raise ValueError(f"kd_kl: temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_position = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    if mask is None:
        return temperature ** 2 * per_position.mean()
    if mask.shape != per_position.shape:
        raise ValueError(f"kd_kl: mask shape {tuple(mask.shape)} must be the logits' leading shape "
                         f"{tuple(per_position.shape)}")
    keep = mask.to(per_position.device).bool()
    return temperature ** 2 * (per_position * keep).sum() / keep.sum().clamp(min=1)


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def embedding_distill_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                           attention_mask: torch.Tensor | None, kind: str = "cosine",
                           pooled: bool = True) -> torch.Tensor:
    """Match hidden states [B, L, H]: mean-pooled sentence embeddings (pooled=True, the model's own
    pooling for sentence-transformers) or every non-padding token (pooled=False).
    kind "cosine": mean of (1 - cos); "mse": mean squared error per element."""
    if kind not in ("cosine", "mse"):
        raise ValueError(f"embedding_distill_loss: kind must be 'cosine' or 'mse', got {kind!r}")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"embedding_distill_loss: student hidden {tuple(student_hidden.shape)} and teacher "
                         f"hidden {tuple(teacher_hidden.shape)} differ")
    s, t = student_hidden.float(), teacher_hidden.detach().float()
    if attention_mask is None:
        attention_mask = torch.ones(s.shape[:-1], device=s.device)
    if pooled:
        s, t = _pool(s, attention_mask), _pool(t, attention_mask)
        keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        keep = attention_mask.to(s.device).bool()
    if kind == "cosine":
        per_item = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        per_item = ((s - t) ** 2).mean(-1)
    return (per_item * keep).sum() / keep.sum().clamp(min=1)


def _field(output, name: str):
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


@dataclass
class DistillLoss:
    """Callable(student_out, teacher_out, hard_loss=None, mask=None) -> total loss (see module doc).

    hard_loss None takes `student_out.loss` (the task / MLM+NSP loss Hugging Face computes from labels).
    After each call `last` holds the parts {"hard", "soft", "total"} as detached tensors, for logging.
    """

    w_hard: float = 0.5
    w_soft: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0
    hidden_kind: str = "cosine"

    def __post_init__(self):
        if self.w_hard < 0 or self.w_soft < 0 or self.hidden_weight < 0:
            raise ValueError("DistillLoss: weights must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"DistillLoss: temperature must be > 0, got {self.temperature}")
        if self.hidden_kind not in ("cosine", "mse"):
            raise ValueError(f"DistillLoss: hidden_kind must be 'cosine' or 'mse', got {self.hidden_kind!r}")
        self.last: dict[str, float] = {}

    def soft_loss(self, student_out, teacher_out, mask=None) -> torch.Tensor:
        parts = []
        for name in _TOKEN_HEADS:
            s, t = _field(student_out, name), _field(teacher_out, name)
            if s is not None and t is not None:
                token_mask = mask if (mask is not None and s.dim() == 3) else None
                parts.append(kd_kl(s, t, self.temperature, token_mask))
        for name in _SEQUENCE_HEADS:
            s, t = _field(student_out, name), _field(teacher_out, name)
            if s is not None and t is not None:
                parts.append(kd_kl(s, t, self.temperature))
        spans = [(_field(student_out, n), _field(teacher_out, n)) for n in _SPAN_HEADS]
        if all(s is not None and t is not None for s, t in spans):
            parts.append(sum(kd_kl(s, t, self.temperature) for s, t in spans) / 2)
        if parts:
            return sum(parts)
        s, t = _field(student_out, "last_hidden_state"), _field(teacher_out, "last_hidden_state")
        if s is None or t is None:
            raise ValueError("DistillLoss: the outputs share no logits (logits, prediction_logits, "
                             "seq_relationship_logits, start/end_logits) and no last_hidden_state to distill")
        return embedding_distill_loss(s, t, mask, self.hidden_kind)

    def __call__(self, student_out, teacher_out, hard_loss: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        if hard_loss is None:
            hard_loss = _field(student_out, "loss")
        if hard_loss is None and self.w_hard > 0:
            raise ValueError("DistillLoss: no hard loss (pass labels to the student or hard_loss=...), or "
                             "set w_hard=0 for pure distillation")
        soft = self.soft_loss(student_out, teacher_out, mask)
        total = self.w_soft * soft
        if self.w_hard > 0:
            total = total + self.w_hard * hard_loss
        if self.hidden_weight > 0:
            s, t = _field(student_out, "last_hidden_state"), _field(teacher_out, "last_hidden_state")
            if s is None or t is None:
                raise ValueError("DistillLoss(hidden_weight>0) needs last_hidden_state in both outputs "
                                 "(call the models with output_hidden_states or use a base model)")
            total = total + self.hidden_weight * embedding_distill_loss(s, t, mask, self.hidden_kind)
        # detached tensors, not floats: a float() here would sync the GPU every step
        self.last = {"hard": (hard_loss.detach() if hard_loss is not None else torch.zeros(())),
                     "soft": soft.detach(), "total": total.detach()}
        return total


_HEAD_SUFFIXES = ("ForPreTraining", "ForMaskedLM", "ForSequenceClassification", "ForQuestionAnswering",
                  "ForTokenClassification", "ForNextSentencePrediction", "ForMultipleChoice", "Model")


def _head_kind(model) -> str:
    cls = type(model).__name__
    for suffix in _HEAD_SUFFIXES:
        if cls.endswith(suffix):
            return suffix
    return cls


def _config_field(cfg, name: str, alias: str):
    """cfg.name, or cfg.alias for configs that spell it differently (DistilBERT: dim, n_layers)."""
    return getattr(cfg, name, getattr(cfg, alias, None))


def check_teacher_student(teacher, student, *, same_architecture: bool = True) -> None:
    """Raise ValueError, before any training step, if the teacher can't teach this student.

    Checked: both have a config; same vocabulary size (logit KD compares token distributions); the same
    head (e.g. both *ForMaskedLM); the same number of labels for classifiers; the same hidden size (for
    hidden-state losses); with same_architecture (Prune OFA's student is a copy of the teacher) also
    the same model_type and number of layers."""
    t_cfg, s_cfg = getattr(teacher, "config", None), getattr(student, "config", None)
    if t_cfg is None or s_cfg is None:
        raise ValueError("check_teacher_student: teacher and student must be Hugging Face models with a .config")
    problems = []
    if getattr(t_cfg, "vocab_size", None) != getattr(s_cfg, "vocab_size", None):
        problems.append(f"vocabulary size {t_cfg.vocab_size} (teacher) vs {s_cfg.vocab_size} (student)")
    if _head_kind(teacher) != _head_kind(student):
        problems.append(f"head {type(teacher).__name__} (teacher) vs {type(student).__name__} (student)")
    if _head_kind(student) in ("ForSequenceClassification", "ForTokenClassification") and \
            getattr(t_cfg, "num_labels", None) != getattr(s_cfg, "num_labels", None):
        problems.append(f"num_labels {t_cfg.num_labels} (teacher) vs {s_cfg.num_labels} (student)")
    t_hidden, s_hidden = (_config_field(c, "hidden_size", "dim") for c in (t_cfg, s_cfg))
    if t_hidden != s_hidden:
        problems.append(f"hidden size {t_hidden} (teacher) vs {s_hidden} (student)")
    if same_architecture:
        if t_cfg.model_type != s_cfg.model_type:
            problems.append(f"model_type {t_cfg.model_type!r} (teacher) vs {s_cfg.model_type!r} (student)")
        t_layers, s_layers = (_config_field(c, "num_hidden_layers", "n_layers") for c in (t_cfg, s_cfg))
        if t_layers != s_layers:
            problems.append(f"{t_layers} layers (teacher) vs {s_layers} (student)")
    if problems:
        raise ValueError("teacher and student do not match: " + "; ".join(problems))


__all__ = ["DistillLoss", "check_teacher_student", "embedding_distill_loss", "kd_kl"]
