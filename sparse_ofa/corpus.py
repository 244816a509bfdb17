"""Real English text that every Python install carries: the prose of the Python Language Reference
shipped in `pydoc_data.topics` (what `help("topics")` shows), split into sentences. Offline, no
download, ~1,000 sentences of technical English; used by tests and the demo."""
from __future__ import annotations

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
