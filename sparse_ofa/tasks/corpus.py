"""Offline English text. `english_sentences`: what every Python install carries (the prose of the Python
Language Reference in `pydoc_data.topics` and of standard-library docstrings), ~4,000 sentences of
technical English, used by tests and benchmarks. `general_sentences`: general-domain English (Rotten
Tomatoes critic snippets and STS-B train sentences, where present), the demo's distillation text."""
from __future__ import annotations

import itertools
import random
import re
from functools import lru_cache

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PLAIN = re.compile(r"[A-Za-z0-9 ,.;:()'\"!?-]+")


@lru_cache(maxsize=1)
def python_docs_sentences() -> tuple[str, ...]:
    """Every prose sentence of 40-300 plain characters and at least 7 words, in a fixed order."""
    from pydoc_data.topics import topics

    sentences = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            if para.startswith("   ") or para.lstrip().startswith((">>>", "*", "-", "=")):
                continue  # code, lists and tables
            for s in _SENTENCE_END.split(" ".join(para.split())):
                if 40 <= len(s) <= 300 and s.count(" ") >= 6 and _PLAIN.fullmatch(s):
                    sentences.append(s)
    return tuple(dict.fromkeys(sentences))  # drop repeats, keep order


def sample_sentences(n: int, seed: int = 0) -> list[str]:
    """n distinct sentences, a seeded random sample."""
    pool = python_docs_sentences()
    if n > len(pool):
        raise ValueError(f"asked for {n} sentences; the offline corpus has {len(pool)}")
    return random.Random(seed).sample(list(pool), n)


# Standard-library modules whose docstrings are prose written by people (no generated text). Modules
# missing from an install (e.g. tkinter) are skipped.
_DOCSTRING_MODULES = (
    "argparse asyncio collections concurrent.futures contextlib csv dataclasses datetime decimal "
    "difflib email enum fractions functools heapq http.client imaplib inspect io ipaddress itertools "
    "json logging mailbox multiprocessing numbers optparse os pathlib pickle pdb pprint queue random "
    "re selectors shutil smtplib socket sqlite3 ssl statistics string subprocess tarfile tempfile "
    "textwrap threading tkinter turtle unittest urllib.request uuid warnings xml.dom.minidom "
    "zipfile calendar codecs configparser copy doctest ftplib gettext glob gzip hashlib hmac locale "
    "mimetypes operator platform sched secrets shelve signal struct sysconfig timeit traceback types "
    "weakref wave webbrowser"
).split()


def _prose_sentences(text: str) -> list[str]:
    """The plain-prose sentences of a docstring or help page (code, lists and tables skipped)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if para.startswith("   ") or para.lstrip().startswith((">>>", "*", "-", "=")):
            continue
        for s in _SENTENCE_END.split(" ".join(para.split())):
            if 40 <= len(s) <= 300 and s.count(" ") >= 6 and _PLAIN.fullmatch(s):
                out.append(s)
    return out


def _docstrings(module) -> list[str]:
    import inspect

    docs = [module.__doc__]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported from elsewhere: counted where it lives
        docs.append(obj.__doc__)
        if inspect.isclass(obj):
            docs += [m.__doc__ for n, m in sorted(vars(obj).items())
                     if not n.startswith("_") and inspect.isfunction(m)]
    return [inspect.cleandoc(d) for d in docs if d]


@lru_cache(maxsize=1)
def stdlib_docstring_sentences() -> tuple[str, ...]:
    """Prose sentences from the docstrings of ~90 standard-library modules (~3,000), fixed order."""
    import importlib
    import warnings

    sentences = []
    for name in _DOCSTRING_MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - an optional stdlib module (tkinter, ...) is absent
                continue
        for doc in _docstrings(module):
            sentences += _prose_sentences(doc)
    return tuple(dict.fromkeys(sentences))


@lru_cache(maxsize=1)
def english_sentences() -> tuple[str, ...]:
    """All offline sentences: the Language Reference's, then the stdlib docstrings' (deduplicated)."""
    return tuple(dict.fromkeys(python_docs_sentences() + stdlib_docstring_sentences()))


def train_heldout_split(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint seeded samples of english_sentences(): (train, held-out)."""
    return sample_split(english_sentences(), n_train, n_heldout, seed)


# General-domain English for distillation: what a sentence encoder is used on (reviews, news, captions,
# forum posts) rather than Python's own documentation.
GENERAL_SOURCES = ("rotten_tomatoes_train", "stsb_train")


def general_sentences(stsb: str | None = None, log=None) -> tuple[tuple[str, ...], list[str]]:
    """(sentences, sources used): the snippets of the Rotten Tomatoes *train* split (sparse_ofa.tasks.data's
    fixed split; dev and test snippets are never used) interleaved with the distinct sentences of the
    STS-B *train* split (no scores; dev and test never), each where available. Raises
    DataNotFoundError when neither is."""
    from .data import DataNotFoundError, load_rotten_tomatoes
    from .evaluation import stsb_sentences

    parts, used, missing = [], [], []
    try:
        parts.append([e["text_a"] for e in load_rotten_tomatoes("train")])
        used.append("rotten_tomatoes_train")
    except DataNotFoundError as exc:
        missing.append(str(exc))
    try:
        parts.append(stsb_sentences(stsb))
        used.append("stsb_train")
    except DataNotFoundError as exc:
        missing.append(str(exc))
    if not parts:
        raise DataNotFoundError("no general-domain text: " + " | ".join(missing))
    if missing and log is not None:
        log("general-domain text: using " + ", ".join(used) + "; missing: " + " | ".join(missing))
    # round-robin, so any prefix (and any seeded sample) draws from every source alike
    mixed = [s for group in itertools.zip_longest(*parts) for s in group if s is not None]
    return tuple(dict.fromkeys(mixed)), used


def sample_split(pool, n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint seeded samples of `pool`: (train, held-out)."""
    pool = list(pool)
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"need at least one train and one held-out sentence, got {n_train}, {n_heldout}")
    if n_train + n_heldout > len(pool):
        raise ValueError(f"asked for {n_train} + {n_heldout} sentences; the corpus has {len(pool)}")
    picked = random.Random(seed).sample(pool, n_train + n_heldout)
    return picked[:n_train], picked[n_train:]


class SentenceBatches:
    """Shuffled batches of tokenized sentences, epoch after epoch: a re-iterable for train_prune_ofa.

    Each group of 16 batches is sorted by length (less padding), and the batches are shuffled again.
    A batch is the tokenizer's tensors plus "sentences", the texts themselves (what a TeacherCache
    looks the teacher's states up by). One seeded generator runs through all epochs: each iteration
    is the next epoch, and a fresh SentenceBatches with the same seed gives the same stream."""

    def __init__(self, sentences: list[str], tokenizer, batch_size: int, max_length: int, seed: int = 0):
        self.sentences, self.tokenizer = list(sentences), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self._rng = random.Random(seed)

    def __iter__(self):
        order = self.sentences[:]
        self._rng.shuffle(order)
        chunk = self.batch_size * 16
        for i in range(0, len(order), chunk):
            group = sorted(order[i:i + chunk], key=len)
            batches = [group[j:j + self.batch_size] for j in range(0, len(group), self.batch_size)]
            self._rng.shuffle(batches)
            for texts in batches:
                tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                        return_tensors="pt")
                yield {**tokens, "sentences": texts}
