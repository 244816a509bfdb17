"""Prune OFA for a sentence encoder (a teacher without an MLM head, e.g. all-MiniLM-L6-v2): the recipe
`sparse-ofa demo` runs for ten minutes and `sparse-ofa prune --objective embedding` for any budget.

    recipe = EncoderRecipe(steps=10_000, bf16=cpu_has_bf16())
    student = prune_encoder(teacher, tokenizer, sentences, recipe, sparsity=0.9, pattern="1x4")

It composes the library: GMP (training.pruning, cubic from 0 to the target over the first
`ramp_fraction` of the steps) on the layers sparsify() swaps; distillation on hidden states
(training.distill.HiddenStateDistillation: 1 - cosine of the mean-pooled embeddings + per-layer MSE
normalised by the teacher's mean square); the LR of training.optim.gmp_lr_factor; train_prune_ofa.
Why each choice (the trials behind them: bench/NOTES.md, "Demo recipe history"):
- no dropout: the student imitates a deterministic teacher, and dropout noise costs quality;
- frozen embeddings: never pruned and already the teacher's, so training them only costs time (they
  are half of all-MiniLM-L6-v2's parameters); the pooler, outside the sentence embedding, too;
- the LR follows the GMP target during the ramp (`lr_schedule="sparsity"`): at the full rate from
  step 0 the student walks away from its teacher before anything is pruned; at 90 % recovery needs a
  high peak (AdamW 2e-3), and a long ramp (85 % of the steps) beats a short one;
- AdamW eps 1e-6: right after a mask update that removed little the gradients are ~1e-9, and Adam's
  scale invariance would turn them into full-LR random steps (real distillation gradients are
  1e-5..1e-1, untouched by this eps);
- the step is made cheap, since quality is bought with steps: the teacher's hidden states are
  computed once per sentence (TeacherCache, where they fit in `cache_limit_gb`), attention runs
  "eager" while training (torch's CPU flash-attention backward is slow at ~22 tokens), AdamW is
  fused, and the forwards run under bf16 autocast where the hardware computes bf16 natively.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..selection import FilterFn, is_encoder_linear


@dataclass(frozen=True)
class EncoderRecipe:
    steps: int = 2500             # optimizer steps: the GMP ramp, then recovery at the final masks
    ramp_fraction: float = 0.85   # the cubic ramp covers this share of `steps`
    update_every: int | None = None  # mask recomputation interval (None: 80 updates over `steps`)
    batch_size: int = 16
    lr: float = 2e-3              # AdamW peak; linear warm-up over `warmup_steps`, decay after the ramp
    warmup_steps: int = 10
    lr_schedule: str = "sparsity"  # "sparsity": during the ramp lr * max(lr_floor, s(t) / s_final);
                                  # "flat": the full LR from the warm-up on
    lr_floor: float = 0.05
    hidden_weight: float = 1.0    # per-layer hidden-state MSE next to the pooled cosine
    layerwise_weight: float = 0.0  # teacher-forced per-layer reconstruction (needs the teacher's forward)
    max_length: int = 64          # training truncation
    bf16: bool = False            # forwards under bf16 autocast on the training device
    seed: int = 0
    cache_limit_gb: float = 8.0   # the teacher's states are cached when they take at most this much

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.update_every is not None and self.update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {self.update_every}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("sparsity", "flat"):
            raise ValueError(f"lr_schedule must be 'sparsity' or 'flat', got {self.lr_schedule!r}")
        if not 0.0 < self.lr_floor <= 1.0:
            raise ValueError(f"lr_floor must be in (0, 1], got {self.lr_floor}")
        if not 0.0 < self.ramp_fraction <= 1.0:
            raise ValueError(f"ramp_fraction must be in (0, 1], got {self.ramp_fraction}")
        if self.cache_limit_gb < 0:
            raise ValueError(f"cache_limit_gb must be >= 0, got {self.cache_limit_gb}")

    def gmp_schedule(self, sparsity: float):
        """The GMP schedule of this recipe: 0 -> `sparsity` over the ramp, masks every `update_every`."""
        from .pruning import GMPSchedule

        ramp = max(1, round(self.ramp_fraction * self.steps))
        every = self.update_every if self.update_every is not None else max(1, round(self.steps / 80))
        return GMPSchedule(sparsity, 0.0, start_step=0, ramp_steps=min(ramp, max(1, self.steps - 1)),
                           update_every=every)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16), where bf16 autocast pays."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def freeze_embeddings_and_pooler(model: nn.Module) -> None:
    """Train the encoder layers alone: the embeddings are never pruned and already the teacher's, and
    the pooler is not part of the mean-pooled sentence embedding (it gets no gradient, which
    DistributedDataParallel would refuse)."""
    for name, p in model.named_parameters():
        outside = name.startswith(("embeddings.", "pooler.")) or ".embeddings." in name or ".pooler." in name
        p.requires_grad_(not outside)


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Train with Hugging Face's "eager" attention, then restore the model's own (sdpa, which
    sparse_ofa's fast path needs). At the demo's shapes (16 sentences of ~22 tokens, 12 heads of 32)
    torch's CPU flash-attention backward costs ~60 ms per step, the eager matmul + softmax backward a
    few: the step drops from ~165 to ~103 ms (bench/NOTES.md)."""
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original is None or original == "eager":
        yield model
        return
    _set_attention(model, "eager")
    try:
        yield model
    finally:
        _set_attention(model, original)


def _set_attention(model: nn.Module, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # older transformers: the attention layers read the shared config at call time
        model.config._attn_implementation = implementation


def teacher_cache_bytes(teacher: nn.Module, tokenizer, sentences: list[str], max_length: int) -> int:
    """Bytes a TeacherCache of `sentences` would hold: float32 states of every layer for every token."""
    config = teacher.config
    lengths = tokenizer(list(dict.fromkeys(sentences)), truncation=True, max_length=max_length)["input_ids"]
    return sum(map(len, lengths)) * (config.num_hidden_layers + 1) * config.hidden_size * 4


def build_teacher_cache(teacher: nn.Module, tokenizer, sentences: list[str], recipe: EncoderRecipe, log=print):
    """The TeacherCache of `sentences` when the recipe can use one (no teacher-forced loss) and it fits
    in recipe.cache_limit_gb, else None (the teacher then runs on every step)."""
    from .distill import TeacherCache

    if recipe.layerwise_weight != 0:  # the teacher-forced loss needs the teacher's own forward
        return None
    need = teacher_cache_bytes(teacher, tokenizer, sentences, recipe.max_length)
    if need > recipe.cache_limit_gb * 2**30:
        log(f"the teacher's hidden states for {len(sentences)} sentences would take {need / 2**30:.1f} GB "
            f"(> cache_limit_gb {recipe.cache_limit_gb}): the teacher runs on every step instead")
        return None
    log(f"caching the teacher's hidden states for {len(sentences)} training sentences ({need / 2**30:.2f} GB) ...")
    return TeacherCache(teacher, tokenizer, sentences, recipe.max_length, recipe.bf16)


def distill_phase(student: nn.Module, teacher: nn.Module, batches, recipe: EncoderRecipe, *, steps: int,
                  lr: float, pruner=None, lock=None, bf16: bool = False, teacher_cache=None,
                  on_step: Callable | None = None, **loop_kwargs) -> dict[str, float]:
    """One phase of distillation through train_prune_ofa: GMP with `pruner`, or the pattern held by
    `lock` (QAT); `student` may be wrapped in DistributedDataParallel. Fused AdamW (eps 1e-6), the LR of gmp_lr_factor, no dropout, eager attention.
    on_step(info, metrics) after every step (metrics: the batch's {"cosine": ...}). loop_kwargs go to
    train_prune_ofa (checkpoint_dir, checkpoint_every, resume, progress, description). Returns the
    last batch's metrics."""
    from .ddp import unwrap
    from .distill import HiddenStateDistillation
    from .loop import train_prune_ofa
    from .optim import adamw, gmp_lr_factor

    optimizer = adamw(student, lr, eps=1e-6, fused=True)
    schedule = pruner.schedule if pruner is not None else None
    warmup = min(recipe.warmup_steps, max(1, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: gmp_lr_factor(step, steps, warmup, schedule, recipe.lr_schedule, recipe.lr_floor))
    loss_fn = HiddenStateDistillation(recipe.hidden_weight, recipe.layerwise_weight,
                                      bf16=bf16, teacher_cache=teacher_cache)
    record = None if on_step is None else (lambda info: on_step(info, loss_fn.last))
    loop_kwargs.setdefault("progress", False)
    with eager_attention(unwrap(student)):
        train_prune_ofa(student, teacher, batches, optimizer=optimizer, scheduler=scheduler, pruner=pruner,
                        lock=lock, steps=steps, loss_fn=loss_fn, dropout=False, on_step=record, **loop_kwargs)
    loss_fn.remove_hooks()
    return dict(loss_fn.last)


def prune_encoder(teacher: nn.Module, tokenizer, sentences: list[str], recipe: EncoderRecipe, sparsity: float,
                  pattern: str = "unstructured", *, filter_fn: FilterFn = is_encoder_linear,
                  on_step: Callable | None = None, log=print, teacher_cache=None, **loop_kwargs) -> nn.Module:
    """The Prune OFA phase: a copy of `teacher` pruned by GMP to `sparsity` (`pattern`) on the layers
    `filter_fn` picks (default: those sparsify() swaps, so the reported sparsity is what runs), distilled
    on `sentences` for recipe.steps, on the teacher's device. Under torchrun every process trains on its
    share of the sentences and the student is wrapped in DistributedDataParallel. Returns the fp32 sparse
    student (masks applied, no hooks, unwrapped). teacher_cache: one build_teacher_cache made for these
    sentences (None: built here)."""
    import copy

    from ..tasks.corpus import SentenceBatches
    from .ddp import is_distributed, shard, wrap_ddp
    from .pruning import Pruner

    if not sentences:
        raise ValueError("prune_encoder needs training sentences, got none")
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    freeze_embeddings_and_pooler(student)
    pruner = Pruner(student, recipe.gmp_schedule(sparsity), pattern=pattern, filter_fn=filter_fn)
    if is_distributed():
        sentences = shard(sentences)
    cache = teacher_cache if teacher_cache is not None else build_teacher_cache(teacher, tokenizer, sentences,
                                                                                recipe, log)
    # "prune" seeds the batch order as the demo always has: seed + len("prune")
    batches = SentenceBatches(sentences, tokenizer, recipe.batch_size, recipe.max_length, seed=recipe.seed + 5)
    report = None if on_step is None else (
        lambda info, metrics: on_step(info, {**metrics, "sparsity": pruner.current_sparsity}))
    trained = wrap_ddp(student, next(teacher.parameters()).device) if is_distributed() else student
    distill_phase(trained, teacher, batches, recipe, steps=recipe.steps, lr=recipe.lr, pruner=pruner,
                  bf16=recipe.bf16, teacher_cache=cache, on_step=report, **loop_kwargs)
    del cache
    pruner.remove_hooks()
    return student


__all__ = ["EncoderRecipe", "build_teacher_cache", "cpu_has_bf16", "distill_phase", "eager_attention", "freeze_embeddings_and_pooler",
           "prune_encoder", "teacher_cache_bytes"]
