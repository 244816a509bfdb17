"""The demo's PNG: training curve, quality against the teacher, speed. matplotlib with the Agg
backend (no display needed)."""
from __future__ import annotations

from pathlib import Path

_MODELS = [("prune_ofa_sparse_int8", "Prune OFA\nsparse INT8"), ("prune_ofa_fp32", "Prune OFA\nfp32"),
           ("oneshot_sparse_int8", "one-shot\nsparse INT8"), ("oneshot_fp32", "one-shot\nfp32"),
           ("dense_int8", "dense INT8\n(dynamic)")]
_METRICS = [("mean_cosine", "mean cosine"), ("top1", "top-1 NN agreement"), ("top5_overlap", "top-5 NN overlap")]


def plot_report(report: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = report["sparsity"]
    fig, (ax_train, ax_quality, ax_speed) = plt.subplots(1, 3, figsize=(17, 5.2),
                                                          gridspec_kw={"width_ratios": [1.1, 1.5, 0.9]})
    fig.suptitle(f"sparse_ofa demo: all-MiniLM-L6-v2, {sp['overall']:.0%} {sp['pattern']} sparse + INT8 "
                 f"(held-out: {report['corpus']['heldout']} sentences)", fontsize=13)

    # training: loss and sparsity over the global step, QAT shaded
    hist = report["history"]
    steps = list(range(len(hist)))
    cos = [h["batch_cosine"] for h in hist]
    ax_train.plot(steps, cos, color="tab:blue", lw=1, label="embedding cosine (training batch)")
    ax_train.set_ylim(max(0.0, min(cos) - 0.05) if cos else 0.0, 1.0)
    ax_train.set_xlabel("optimizer step")
    ax_train.set_ylabel("cosine to the teacher", color="tab:blue")
    qat = [i for i, h in enumerate(hist) if h["phase"] == "qat"]
    if qat:
        ax_train.axvspan(qat[0], qat[-1] + 1, color="tab:orange", alpha=0.15, label="QAT (lock + KD)")
    ax_sp = ax_train.twinx()
    ax_sp.plot(steps, [100 * h["sparsity"] for h in hist], color="tab:red", lw=1.5, label="sparsity")
    ax_sp.set_ylabel("sparsity %", color="tab:red")
    ax_sp.set_ylim(0, 100)
    lines = ax_train.get_legend_handles_labels()
    more = ax_sp.get_legend_handles_labels()
    ax_train.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    ax_train.set_title("GMP + distillation, then QAT")

    # quality: grouped bars
    q = report["quality_vs_teacher"]
    width = 0.26
    for j, (key, label) in enumerate(_METRICS):
        xs = [i + (j - 1) * width for i in range(len(_MODELS))]
        vals = [q[m][key] for m, _ in _MODELS]
        bars = ax_quality.bar(xs, vals, width, label=label)
        for x, v in zip(xs, vals):
            ax_quality.text(x, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
        bars[0].set_edgecolor("black")
    ax_quality.axhline(report["goal"]["mean_cosine_min"], color="gray", ls="--", lw=1)
    ax_quality.text(-0.45, report["goal"]["mean_cosine_min"] + 0.005, f"goal {report['goal']['mean_cosine_min']}",
                    ha="left", va="bottom", fontsize=8, color="gray")
    ax_quality.set_xticks(range(len(_MODELS)))
    ax_quality.set_xticklabels([label for _, label in _MODELS], fontsize=9)
    ax_quality.set_ylim(0, 1.15)
    ax_quality.set_ylabel("agreement with the dense fp32 teacher")
    ax_quality.legend(loc="upper right", fontsize=8, ncol=3)
    ax_quality.set_title("quality on held-out text")

    # speed
    s = report["speed"]
    names = [("dense_fp32", "dense fp32"), ("dense_int8", "dense INT8\n(dynamic)"), ("sparse_int8", "sparse INT8\n(Prune OFA)")]
    ms = [s["median_ms"][k] for k, _ in names]
    bars = ax_speed.bar(range(3), ms, color=["tab:gray", "tab:blue", "tab:green"])
    for i, (bar, v) in enumerate(zip(bars, ms)):
        ax_speed.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.0f} ms\n{ms[0] / v:.1f}x vs fp32",
                      ha="center", va="bottom", fontsize=9)
    ax_speed.set_xticks(range(3))
    ax_speed.set_xticklabels([n for _, n in names], fontsize=9)
    ax_speed.set_ylim(0, max(ms) * 1.3)
    ax_speed.set_ylabel("median ms per batch")
    title = f"speed: batch {s['batch']} x seq {s['seq']}, {s['threads']} threads"
    one = s.get("single_sentence")  # (reports from before it was measured have none)
    if one:
        ms1 = one["median_ms"]
        title += (f"\n1 sentence, {one['seq']} tokens: {ms1['dense_fp32']:.1f} / "
                  f"{ms1['dense_int8']:.1f} / {ms1['sparse_int8']:.1f} ms")
    ax_speed.set_title(title, fontsize=10)

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
