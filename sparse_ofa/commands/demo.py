"""`sparse-ofa demo`: Prune OFA on the real all-MiniLM-L6-v2, offline, end to end (sparse_ofa.demo):
GMP to 90 % with distillation, QAT, sparse INT8; quality (STS-B dev Spearman where the data is present,
and agreement with the teacher on held-out text) next to one-shot magnitude pruning, and speed vs dense
fp32 / dense INT8; report.json + report.png + the sparse student (OUTPUT/student) in --output."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from ..demo.run import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="Prune OFA the real all-MiniLM-L6-v2 to 90%% sparse INT8 and report "
                                    "quality (STS-B dev) and speed (offline, ~10 min on 2 cores)",
                       description=__doc__)
    p.add_argument("--sparsity", type=float, default=d.sparsity)
    p.add_argument("--pattern", choices=["unstructured", "1x4"], default=d.pattern)
    p.add_argument("--steps", type=int, default=None,
                   help="Prune OFA steps (default 2500 with bf16, 1600 without, or fewer where the step time "
                        "measured at the start would overrun --budget-minutes)")
    p.add_argument("--budget-minutes", type=float, default=d.budget_minutes,
                   help=f"wall-clock budget of the whole demo that the default step count is fitted to "
                        f"(default {d.budget_minutes:g}; an explicit --steps is run as given)")
    p.add_argument("--qat-steps", type=int, default=None, help=f"QAT steps (default {d.qat_steps})")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default {d.lr})")
    p.add_argument("--batch-size", type=int, default=None, help=f"sentences per step (default {d.batch_size})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="Prune OFA phase under CPU bf16 autocast (~1.9x faster steps; weights, masks and QAT "
                   "stay fp32). Default: on where the CPU has AVX-512 BF16")
    p.add_argument("--corpus", choices=["general", "python-docs"], default=d.corpus,
                   help="distillation text: general = Rotten Tomatoes train snippets + STS-B train sentences "
                        "(where installed / present), python-docs = Python's own documentation")
    p.add_argument("--lr-schedule", choices=["sparsity", "flat"], default=d.lr_schedule,
                   help="sparsity: the LR follows the GMP target during the ramp (gentle while little is "
                        "pruned); flat: full LR from the warm-up on")
    p.add_argument("--stsb", default=None, metavar="DIR",
                   help="STS-B folder (stsb-en-dev.csv, or a datasets save_to_disk folder) for the dev "
                        "Spearman; default ../shared/data/stsb next to the repository, else the datasets cache")
    p.add_argument("--no-stsb", action="store_true", help="skip the STS-B evaluation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="a < 60 s smoke run with tiny numbers (quality "
                   "is not meaningful)")
    p.add_argument("--output", default="sparse_ofa_out/demo", help="folder for report.json and report.png")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo.run import DemoConfig, quick_config, run_demo

    overrides = {"sparsity": args.sparsity, "pattern": args.pattern, "seed": args.seed, "threads": args.threads,
                 "bf16": args.bf16, "corpus": args.corpus, "lr_schedule": args.lr_schedule,
                 "stsb": "" if args.no_stsb else args.stsb, "budget_minutes": args.budget_minutes}
    for name in ("steps", "qat_steps", "lr", "batch_size"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    cfg = quick_config(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(cfg, args.output)
    return 0
