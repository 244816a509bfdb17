"""Quality on real benchmarks: STS-B (sentence similarity, Spearman x 100) for any sentence encoder, and
accuracy of a sentence classifier on the fixed Rotten Tomatoes split (sparse_ofa.tasks.data).

STS-B: each pair's score is the cosine of the two mean-pooled, L2-normalised sentence embeddings (the
sentence-transformers recipe all-MiniLM-L6-v2 was trained with); the metric is the Spearman rank
correlation of those cosines with the human scores, x 100. all-MiniLM-L6-v2 scores 86.7 on dev.
The encoder may be dense fp32, fake-quant (QAT) or sparsified (SparseInt8Linear): anything whose forward
takes the tokenizer's batch and returns `last_hidden_state` (or `hidden_states` with
output_hidden_states=True, e.g. a *ForSequenceClassification model).

Where STS-B comes from, in order (`load_stsb`):
  1. a path you give (`--stsb DIR`): a folder with our CSV layout, `stsb-en-<split>.csv` (no header:
     sentence1, sentence2, score 0-5; the layout of PhilipMay/stsb-multi-mt), or one such CSV file,
     or a CSV/TSV/JSONL with a header naming sentence1, sentence2 and a score column, or a folder
     written by `datasets`' save_to_disk;
  2. otherwise `../shared/data/stsb/` next to the repository (`default_stsb_dir`);
  3. otherwise the offline `datasets` cache: stsb_multi_mt (en), sentence-transformers/stsb,
     mteb/stsbenchmark-sts or glue/stsb, whichever was downloaded once.
STS-B is evaluation data: only the train split's sentences (never its scores) may serve as unlabeled
distillation text (`stsb_sentences`).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
from torch import nn

from .data import DataNotFoundError

STSB_DEV_FILE = "stsb-en-dev.csv"
_STSB_SPLITS = {"validation": "dev", "dev": "dev", "train": "train", "test": "test"}
# (dataset, config) tried in the offline datasets cache
_STSB_CACHE = (("stsb_multi_mt", "en"), ("PhilipMay/stsb_multi_mt", "en"), ("sentence-transformers/stsb", None),
               ("mteb/stsbenchmark-sts", None), ("glue", "stsb"))
_SCORE_COLUMNS = ("similarity_score", "score", "label")
STSB_HOW = ("STS-B is read from a folder with stsb-en-dev.csv / stsb-en-train.csv (pass --stsb DIR; "
            "by default ../shared/data/stsb/ next to the repository), or from the offline datasets cache: "
            "python -c \"import datasets; datasets.load_dataset('sentence-transformers/stsb')\" once "
            "on a machine with internet")


def repo_root() -> Path:
    """The repository checkout this package runs from (sparse_ofa/tasks/evaluation.py -> its root)."""
    return Path(__file__).resolve().parents[2]


def default_stsb_dir() -> Path | None:
    """`../shared/data/stsb/` beside the repository (or beside the working directory), if it holds
    the dev split; else None."""
    for base in (repo_root(), Path.cwd()):
        candidate = base.parent / "shared" / "data" / "stsb"
        if (candidate / STSB_DEV_FILE).is_file():
            return candidate
    return None


def _split_name(split: str) -> str:
    if split not in _STSB_SPLITS:
        raise ValueError(f"STS-B split must be one of {sorted(_STSB_SPLITS)}, got {split!r}")
    return _STSB_SPLITS[split]


def _pairs_from_rows(rows: list[dict], where: str) -> list[tuple[str, str, float]]:
    if not rows:
        raise ValueError(f"{where}: no STS-B pairs")
    columns = set(rows[0])
    score = next((c for c in _SCORE_COLUMNS if c in columns), None)
    if not {"sentence1", "sentence2"} <= columns or score is None:
        raise ValueError(f"{where}: STS-B rows need sentence1, sentence2 and one of {_SCORE_COLUMNS}; "
                         f"found {sorted(columns)}")
    return [_pair(r["sentence1"], r["sentence2"], r[score], f"{where} row {i}") for i, r in enumerate(rows)]


def _pair(a, b, score, where: str) -> tuple[str, str, float]:
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: similarity score {score!r} is not a number") from None
    if value != value:  # NaN
        raise ValueError(f"{where}: similarity score is NaN")
    if not str(a).strip() or not str(b).strip():
        raise ValueError(f"{where}: empty sentence")
    return str(a), str(b), value


def read_stsb_csv(path: str | os.PathLike) -> list[tuple[str, str, float]]:
    """Pairs of a header-less STS-B CSV (sentence1, sentence2, score; excel dialect)."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"no STS-B file at {path}; {STSB_HOW}")
    pairs = []
    with path.open(newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if lineno == 1 and row[:2] == ["sentence1", "sentence2"]:  # a header: read it as named columns
                f.seek(0)
                return _pairs_from_rows(list(csv.DictReader(f)), str(path))
            if len(row) != 3:
                raise ValueError(f"{path}:{lineno}: expected 3 columns (sentence1, sentence2, score), "
                                 f"got {len(row)}")
            pairs.append(_pair(*row, where=f"{path}:{lineno}"))
    if not pairs:
        raise ValueError(f"{path}: no STS-B pairs")
    return pairs


def _from_folder(folder: Path, split: str) -> list[tuple[str, str, float]]:
    from .data import _is_saved_dataset, _load_saved_dataset, _split_file, read_rows

    name = _split_name(split)
    ours = folder / f"stsb-en-{name}.csv"
    if ours.is_file():
        return read_stsb_csv(ours)
    if _is_saved_dataset(folder):
        hf_split = "validation" if name == "dev" else name
        return _pairs_from_rows(_load_saved_dataset(folder, hf_split), str(folder))
    found = _split_file(folder, "validation" if name == "dev" else name)
    if found is not None:
        rows = read_rows(found)
        return _pairs_from_rows(rows, str(found))
    raise DataNotFoundError(f"{folder} holds no STS-B {name} split (expected {ours.name}, "
                            f"a save_to_disk folder, or {'validation' if name == 'dev' else name}.csv/.tsv/.jsonl); "
                            f"{STSB_HOW}")


def _from_cache(split: str) -> list[tuple[str, str, float]]:
    name = _split_name(split)
    try:
        import datasets
    except ImportError as exc:
        raise DataNotFoundError(f"STS-B is not available offline and `datasets` is not installed; {STSB_HOW}") \
            from exc
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tried = []
    for path, config in _STSB_CACHE:
        hf_split = {"dev": "dev" if "stsb_multi_mt" in path else "validation"}.get(name, name)
        try:
            rows = datasets.load_dataset(path, config, split=hf_split).to_list()
        except Exception as exc:  # noqa: BLE001 - datasets raises many types when offline and uncached
            tried.append(f"{path}{'/' + config if config else ''} ({type(exc).__name__})")
            continue
        return _pairs_from_rows(rows, f"datasets cache {path}/{hf_split}")
    raise DataNotFoundError(f"STS-B {name} split not found: no local folder, and none of {', '.join(tried)} "
                            f"is in the offline datasets cache; {STSB_HOW}")


def load_stsb(split: str = "validation", source: str | os.PathLike | None = None) -> list[tuple[str, str, float]]:
    """STS-B pairs (sentence1, sentence2, score) of `split` ("validation"/"dev", "train", "test");
    `source` as in the module doc (None: ../shared/data/stsb, then the datasets cache)."""
    _split_name(split)
    if source is not None:
        path = Path(source)
        if path.is_file():
            if path.suffix.lower() == ".csv":
                return read_stsb_csv(path)
            from .data import read_rows

            return _pairs_from_rows(read_rows(path), str(path))
        if path.is_dir():
            return _from_folder(path, split)
        raise DataNotFoundError(f"no STS-B file or folder at {path}; {STSB_HOW}")
    default = default_stsb_dir()
    if default is not None:
        return _from_folder(default, split)
    return _from_cache(split)


def stsb_sentences(source: str | os.PathLike | None = None) -> list[str]:
    """The distinct sentences of the STS-B *train* split, without scores: unlabeled distillation text.
    (Dev and test sentences are never returned: they are what the student is measured on.)"""
    pairs = load_stsb("train", source)
    return list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))


# ------------------------------------------------------------------------------------------ metrics
def _ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata 'average')."""
    values = values.double()
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    n = values.numel()
    ranks = torch.empty(n, dtype=torch.float64)
    start = 0
    while start < n:  # runs of equal values share the mean of their positions
        end = start
        while end + 1 < n and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation of two equal-length sequences (Pearson of their average ranks)."""
    x, y = torch.as_tensor(x, dtype=torch.float64).flatten(), torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() != y.numel():
        raise ValueError(f"spearman: {x.numel()} values against {y.numel()}")
    if x.numel() < 2:
        raise ValueError("spearman needs at least two pairs")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("spearman: NaN or Inf among the values (a broken model gives NaN embeddings)")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    if denom == 0:
        raise ValueError("spearman is undefined when one side is constant")
    return float((rx @ ry).item() / denom)


def encode(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64, max_length: int = 128,
           progress: bool | str = False) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings [len(sentences), hidden], float32, in input order (the
    sentences run sorted by length, in batches of `batch_size`): sparse_ofa.models.minilm.embed."""
    from ..models.minilm import embed

    return embed(model, tokenizer, sentences, batch_size, max_length, normalize=True, by_length=True,
                 progress=progress)


def stsb_spearman(model: nn.Module, tokenizer, pairs: list[tuple[str, str, float]], batch_size: int = 64,
                  max_length: int = 128, progress: bool | str = False) -> float:
    """Spearman x 100 between the cosine of each pair's embeddings and its gold score. Each distinct
    sentence is encoded once."""
    if len(pairs) < 2:
        raise ValueError("STS-B evaluation needs at least two pairs")
    sentences = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    index = {s: i for i, s in enumerate(sentences)}
    emb = encode(model, tokenizer, sentences, batch_size, max_length, progress)
    a = emb[[index[p[0]] for p in pairs]]
    b = emb[[index[p[1]] for p in pairs]]
    cosines = (a * b).sum(-1)
    return 100.0 * spearman(cosines, [p[2] for p in pairs])


@torch.no_grad()
def classification_accuracy(model: nn.Module, tokenizer, examples: list[dict], batch_size: int = 64,
                            max_length: int = 128) -> float:
    """Accuracy of a sequence classifier on examples {"text_a", "text_b", "label"} (e.g. a split of
    sparse_ofa.tasks.data.load_rotten_tomatoes)."""
    from .metrics import accuracy

    if not examples:
        raise ValueError("accuracy of an empty evaluation set is undefined")
    model.eval()
    device = next(model.parameters()).device
    predictions = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = [e["text_b"] for e in chunk] if chunk[0].get("text_b") is not None else None
        batch = tokenizer([e["text_a"] for e in chunk], b, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        predictions += model(**batch).logits.argmax(-1).tolist()
    return accuracy(predictions, [e["label"] for e in examples])


def rotten_tomatoes_accuracy(model: nn.Module, tokenizer, split: str = "validation",
                             source: str | os.PathLike | None = None, max_length: int = 128) -> float:
    """Accuracy on a split of the fixed Rotten Tomatoes split (sparse_ofa.tasks.data.rt_split_of)."""
    from .data import load_rotten_tomatoes

    return classification_accuracy(model, tokenizer, load_rotten_tomatoes(split, source), max_length=max_length)



@torch.no_grad()
def task_metrics(model: nn.Module, task: str, examples: list[dict], tokenizer, max_length: int,
                 batch_size: int = 32) -> dict[str, float]:
    """The task's metrics on `examples`: GLUE accuracy (+ F1 for qqp), SQuAD exact_match / f1."""
    from .data import squad_predictions, task_collator, task_features
    from .metrics import glue_metrics, squad_metrics

    model.eval()
    device = next(model.parameters()).device
    features = task_features(task, examples, tokenizer, max_length, train=False)
    collate = task_collator(tokenizer)
    outputs = []
    for i in range(0, len(features), batch_size):
        chunk = features[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items() if k != "labels"}
        with torch.inference_mode():
            out = model(**batch)
        outputs.append(out.__class__(**{k: v.cpu() for k, v in out.items()}))
    if task == "squad":
        starts = [row for out in outputs for row in out.start_logits]
        ends = [row for out in outputs for row in out.end_logits]
        preds = squad_predictions(examples, features, starts, ends)
        return squad_metrics(preds, {e["id"]: e["answers"]["text"] for e in examples})
    predictions = torch.cat([out.logits.argmax(-1) for out in outputs]).tolist()
    return glue_metrics(task, predictions, [e["label"] for e in examples])

__all__ = ["classification_accuracy", "default_stsb_dir", "encode", "load_stsb", "read_stsb_csv",
           "rotten_tomatoes_accuracy", "spearman", "stsb_sentences", "stsb_spearman", "task_metrics"]
