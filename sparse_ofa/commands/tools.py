"""`sparse-ofa backends` (what can run here) and `sparse-ofa sparsify` (a saved HF model -> packed)."""
from __future__ import annotations

import os


def add_parser(sub) -> None:
    p = sub.add_parser("backends", help="list the kernel backends and whether they run here")
    p.set_defaults(func=run_backends)
    p = sub.add_parser("sparsify", help="pack a saved Hugging Face model's pruned encoder linears")
    p.add_argument("model_dir", help="a save_pretrained directory (local)")
    p.add_argument("output_dir")
    p.add_argument("--pattern", choices=["unstructured", "1x4", "2:4"], default=None,
                   help="check every layer follows this pattern (default: detect per layer)")
    p.set_defaults(func=run_sparsify)


def run_backends(args) -> int:
    from .. import list_backends

    for name, ok, why in list_backends():
        print(f"{name:<10} {'available' if ok else 'unavailable: ' + why}")
    return 0


def run_sparsify(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    from .. import save_pretrained, sparsify

    model = AutoModel.from_pretrained(args.model_dir, local_files_only=True).eval()
    sparsify(model, pattern=args.pattern, verbose=True)
    print(f"saved to {save_pretrained(model, args.output_dir)}")
    return 0
