"""Task metrics: GLUE accuracy (and F1 for QQP), SQuAD v1.1 exact match / F1, and the embedding
agreement numbers the demo reports (cosine, nearest-neighbour retrieval overlap).

SQuAD scoring follows the official v1.1 evaluation script's rules: answers are lower-cased, stripped
of punctuation, the articles a/an/the and extra whitespace before comparison, and a prediction scores
the best match over all reference answers.
"""
from __future__ import annotations

import re
import string
from collections import Counter

import torch


def accuracy(predictions, labels) -> float:
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of an empty evaluation set is undefined")
    return sum(int(p) == int(y) for p, y in zip(predictions, labels)) / len(labels)


def binary_f1(predictions, labels, positive: int = 1) -> float:
    """F1 of the positive class (QQP's "duplicate"); 0.0 when there are no true positives."""
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = sum(int(p) == positive and int(y) == positive for p, y in zip(predictions, labels))
    fp = sum(int(p) == positive and int(y) != positive for p, y in zip(predictions, labels))
    fn = sum(int(p) != positive and int(y) == positive for p, y in zip(predictions, labels))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """{"accuracy": ...} and, for qqp, {"f1": ...} too (the GLUE leaderboard's metrics)."""
    result = {"accuracy": accuracy(predictions, labels)}
    if task == "qqp":
        result["f1"] = binary_f1(predictions, labels)
    return result


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, truth: str) -> float:
    pred_tokens, true_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = Counter(pred_tokens) & Counter(true_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent, like the official script; predictions keyed by question id."""
    if not references:
        raise ValueError("SQuAD evaluation needs at least one question")
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}")
    em = f1 = 0.0
    for qid, answers in references.items():
        if not answers:
            raise ValueError(f"question {qid!r} has no reference answer (SQuAD v1.1 always has one)")
        pred = predictions[qid]
        em += max(float(normalize_answer(pred) == normalize_answer(a)) for a in answers)
        f1 += max(squad_f1(pred, a) for a in answers)
    return {"exact_match": 100.0 * em / len(references), "f1": 100.0 * f1 / len(references)}


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity of two [n, d] embedding matrices."""
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def _neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [n, k] of each row's k most cosine-similar other rows (itself excluded)."""
    unit = torch.nn.functional.normalize(emb.float(), dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=-1).indices


def retrieval_agreement(reference: torch.Tensor, candidate: torch.Tensor, k: int = 5) -> dict[str, float]:
    """How well `candidate` embeddings reproduce `reference`'s nearest neighbours among the same rows.

    top1: fraction of rows whose nearest neighbour is the same; topk_overlap: mean |N_ref ∩ N_cand| / k
    over the k nearest neighbours.
    """
    n = reference.shape[0]
    if reference.shape != candidate.shape:
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} rows, got {k}")
    ref, cand = _neighbours(reference, k), _neighbours(candidate, k)
    top1 = float((ref[:, 0] == cand[:, 0]).float().mean())
    overlap = sum(len(set(r.tolist()) & set(c.tolist())) for r, c in zip(ref, cand)) / (n * k)
    return {"top1": top1, f"top{k}_overlap": overlap}
