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
from torch import nn

from ..models.minilm import mean_pool

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
        s, t = mean_pool(s, attention_mask), mean_pool(t, attention_mask)
        keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        keep = attention_mask.to(s.device).bool()
    if kind == "cosine":
        per_item = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        per_item = ((s - t) ** 2).mean(-1)
    return (per_item * keep).sum() / keep.sum().clamp(min=1)


def output_field(output, name: str):
    """`name` of a model output: a ModelOutput / object attribute or a dict key; None where absent."""
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
            s, t = output_field(student_out, name), output_field(teacher_out, name)
            if s is not None and t is not None:
                token_mask = mask if (mask is not None and s.dim() == 3) else None
                parts.append(kd_kl(s, t, self.temperature, token_mask))
        for name in _SEQUENCE_HEADS:
            s, t = output_field(student_out, name), output_field(teacher_out, name)
            if s is not None and t is not None:
                parts.append(kd_kl(s, t, self.temperature))
        spans = [(output_field(student_out, n), output_field(teacher_out, n)) for n in _SPAN_HEADS]
        if all(s is not None and t is not None for s, t in spans):
            parts.append(sum(kd_kl(s, t, self.temperature) for s, t in spans) / 2)
        if parts:
            return sum(parts)
        s, t = output_field(student_out, "last_hidden_state"), output_field(teacher_out, "last_hidden_state")
        if s is None or t is None:
            raise ValueError("DistillLoss: the outputs share no logits (logits, prediction_logits, "
                             "seq_relationship_logits, start/end_logits) and no last_hidden_state to distill")
        return embedding_distill_loss(s, t, mask, self.hidden_kind)

    def __call__(self, student_out, teacher_out, hard_loss: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        if hard_loss is None:
            hard_loss = output_field(student_out, "loss")
        if hard_loss is None and self.w_hard > 0:
            raise ValueError("DistillLoss: no hard loss (pass labels to the student or hard_loss=...), or "
                             "set w_hard=0 for pure distillation")
        soft = self.soft_loss(student_out, teacher_out, mask)
        total = self.w_soft * soft
        if self.w_hard > 0:
            total = total + self.w_hard * hard_loss
        if self.hidden_weight > 0:
            s, t = output_field(student_out, "last_hidden_state"), output_field(teacher_out, "last_hidden_state")
            if s is None or t is None:
                raise ValueError("DistillLoss(hidden_weight>0) needs last_hidden_state in both outputs "
                                 "(call the models with output_hidden_states or use a base model)")
            total = total + self.hidden_weight * embedding_distill_loss(s, t, mask, self.hidden_kind)
        # detached tensors, not floats: a float() here would sync the GPU every step
        self.last = {"hard": (hard_loss.detach() if hard_loss is not None else torch.zeros(())),
                     "soft": soft.detach(), "total": total.detach()}
        return total


# ---------------------------------------------------------------------- hidden-state distillation
# For a sentence encoder without logits (all-MiniLM-L6-v2): what users consume is the mean-pooled
# embedding, and every layer's token states are supervised too (deep supervision: each pruned layer
# relearns its teacher's output, which recovers far faster than matching the last layer alone).

def normalised_token_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                         keep: torch.Tensor) -> torch.Tensor:
    """MSE over the non-padding tokens (`keep`: [B, L, 1] floats, 1 where a token counts) divided by
    the teacher's mean square there: scale-free, so layers of different magnitude weigh alike."""
    teacher_hidden = teacher_hidden.detach()
    mse = ((student_hidden - teacher_hidden) ** 2 * keep).sum() / (keep.sum() * student_hidden.shape[-1])
    scale = (teacher_hidden ** 2 * keep).sum() / (keep.sum() * teacher_hidden.shape[-1])
    return mse / scale.clamp(min=1e-8)


def hidden_state_distill_loss(student_out, teacher_out, attention_mask: torch.Tensor, hidden_weight: float,
                              parts: dict | None = None) -> torch.Tensor:
    """1 - cos(pooled student, pooled teacher) + hidden_weight * the mean over layers of
    `normalised_token_mse`. Both outputs need `last_hidden_state` and `hidden_states` (the model called
    with output_hidden_states=True). `parts`, if given, receives the batch's mean embedding cosine."""
    loss = embedding_distill_loss(student_out.last_hidden_state, teacher_out.last_hidden_state,
                                  attention_mask, kind="cosine", pooled=True)
    if parts is not None:
        parts["cosine"] = 1.0 - float(loss.detach())
    if hidden_weight > 0:
        keep = attention_mask.unsqueeze(-1).to(torch.float32)
        per_layer = [normalised_token_mse(s, t, keep)
                     for s, t in zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:])]
        loss = loss + hidden_weight * torch.stack(per_layer).mean()
    return loss


class TeacherLayerInputs:
    """Records what each teacher encoder layer was called with, so that the student's layer can be
    run on the teacher's input ("teacher forcing"): each pruned layer then learns to reproduce its
    teacher layer without the errors of the layers below compounding."""

    def __init__(self, teacher: nn.Module):
        self.calls: dict[int, tuple] = {}
        self._handles = [layer.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
                         for i, layer in enumerate(teacher.encoder.layer)]

    def _recorder(self, index: int):
        def record(module, args, kwargs):
            self.calls[index] = (args, kwargs)
        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def layerwise_loss(student: nn.Module, teacher_inputs: TeacherLayerInputs, teacher_out,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of `normalised_token_mse` between student layer i run on the teacher's input
    of layer i and the teacher's output of layer i."""
    keep = attention_mask.unsqueeze(-1).to(torch.float32)
    losses = []
    for i, layer in enumerate(student.encoder.layer):
        args, kwargs = teacher_inputs.calls[i]
        out = layer(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        losses.append(normalised_token_mse(out, teacher_out.hidden_states[i + 1], keep))
    return torch.stack(losses).mean()


class FloatHiddenStates:
    """Hidden states as a model output the losses read, in float32 (from a bf16 autocast forward or
    the teacher cache); the last one is the model's last_hidden_state (the same tensor in HF Bert)."""

    def __init__(self, hidden_states):
        self.hidden_states = tuple(h.float() for h in hidden_states)
        self.last_hidden_state = self.hidden_states[-1]


class TeacherCache:
    """The teacher's hidden states for every training sentence, computed once before training.

    The teacher is frozen and the corpus is fixed, so its forward on a batch is the same every epoch:
    caching it per sentence (unpadded, float32: ~7 x 384 x 4 bytes per token, ~0.7 GB for the demo's
    3,000 sentences) takes the teacher out of the training step (~a fifth of it). A batch's outputs are
    the sentences' cached states padded with zeros, which every loss masks out."""

    def __init__(self, teacher: nn.Module, tokenizer, sentences: list[str], max_length: int, bf16: bool,
                 batch_size: int = 64):
        self._rows: dict[str, torch.Tensor] = {}
        device = next(teacher.parameters()).device
        ordered = sorted(dict.fromkeys(sentences), key=len)
        for i in range(0, len(ordered), batch_size):
            chunk = ordered[i:i + batch_size]
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = teacher(**batch, output_hidden_states=True)
            states = torch.stack([h.float() for h in out.hidden_states], dim=1)  # [B, layers+1, L, H]
            for row, sentence in enumerate(chunk):
                length = int(batch["attention_mask"][row].sum())
                self._rows[sentence] = states[row, :, :length].clone()

    def outputs(self, sentences: list[str], seq_len: int) -> FloatHiddenStates:
        first = self._rows[sentences[0]]
        padded = first.new_zeros(first.shape[0], len(sentences), seq_len, first.shape[-1])
        for i, sentence in enumerate(sentences):
            row = self._rows[sentence]
            padded[:, i, :row.shape[1]] = row
        return FloatHiddenStates(padded.unbind(0))


class HiddenStateDistillation:
    """A `loss_fn` for train_prune_ofa that distills a sentence encoder on its hidden states:
    `hidden_state_distill_loss` (+ layerwise_weight * `layerwise_loss`, teacher forcing).

    bf16: both forwards (and so the backward) run under bf16 autocast on the inputs' device; the loss is
    float32.
    teacher_cache: the teacher's states come from it instead of a teacher forward; the batch must then
    carry its sentences under "sentences" (a non-tensor entry, not passed to the models). After each
    call `last` holds {"cosine": the batch's mean embedding cosine to the teacher}."""

    def __init__(self, hidden_weight: float = 1.0, layerwise_weight: float = 0.0, *, bf16: bool = False,
                 teacher_cache: TeacherCache | None = None):
        if layerwise_weight > 0 and teacher_cache is not None:
            raise ValueError("the teacher-forced layerwise loss needs the teacher's forward: no teacher_cache")
        self.hidden_weight, self.layerwise_weight = hidden_weight, layerwise_weight
        self.bf16, self.teacher_cache = bf16, teacher_cache
        self.last: dict[str, float] = {}
        self._teacher_inputs: TeacherLayerInputs | None = None

    def __call__(self, student: nn.Module, teacher: nn.Module, batch: dict, distill=None) -> torch.Tensor:
        sentences = batch.get("sentences")
        inputs = {k: v for k, v in batch.items() if k != "sentences"}
        if self.layerwise_weight > 0 and self._teacher_inputs is None:
            self._teacher_inputs = TeacherLayerInputs(teacher)
        with torch.autocast(inputs["input_ids"].device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.teacher_cache is not None:
                teacher_out = self.teacher_cache.outputs(sentences, inputs["input_ids"].shape[1])
            else:
                with torch.no_grad():
                    teacher_out = teacher(**inputs, output_hidden_states=True)
            student_out = student(**inputs, output_hidden_states=True)
        if self.bf16:
            student_out = FloatHiddenStates(student_out.hidden_states)
            if self.teacher_cache is None:
                teacher_out = FloatHiddenStates(teacher_out.hidden_states)
        loss = hidden_state_distill_loss(student_out, teacher_out, inputs["attention_mask"], self.hidden_weight,
                                         self.last)
        if self._teacher_inputs is not None:
            loss = loss + self.layerwise_weight * layerwise_loss(student, self._teacher_inputs, teacher_out,
                                                                 inputs["attention_mask"])
        return loss

    def remove_hooks(self) -> None:
        """Unhook the teacher (the layerwise loss records its layers' inputs)."""
        if self._teacher_inputs is not None:
            self._teacher_inputs.remove()
            self._teacher_inputs = None


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


__all__ = ["DistillLoss", "FloatHiddenStates", "HiddenStateDistillation", "TeacherCache", "TeacherLayerInputs",
           "check_teacher_student", "embedding_distill_loss", "hidden_state_distill_loss", "kd_kl", "layerwise_loss",
           "normalised_token_mse", "output_field"]
