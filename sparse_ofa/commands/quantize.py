"""`sparse-ofa quantize MODEL OUTPUT --task sst2 --data-dir DIR`: quantization-aware training of a
sparse fine-tuned model, then conversion to packed sparse INT8.

Q8BERT-style QAT (fake-quant Linear: int8 symmetric weights, per channel by default; activations with
EMA observers, uint8 asymmetric by default) with pattern lock and distillation (--teacher) still on;
then every fake-quant layer becomes a SparseInt8Linear carrying its learned static activation scale
(or, where calibration shows outliers have stretched that range, dynamic per-token activations).
OUTPUT holds the packed model: load it with
    sparse_ofa.from_pretrained(OUTPUT, model_class=AutoModelForSequenceClassification)   # or ...ForQuestionAnswering
"""
from __future__ import annotations

from . import _shared
from .finetune import add_task_args, train_task


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="QAT (lock + KD) then convert to packed sparse INT8",
                       description=__doc__.split("\n\n")[1])
    add_task_args(p)
    p.add_argument("--weight-granularity", choices=["per_channel", "per_tensor"], default="per_channel")
    p.add_argument("--activation", choices=["uint8_asymmetric", "int8_symmetric"], default="uint8_asymmetric")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--backend", default="auto", help="kernel backend of the converted layers")
    p.add_argument("--outlier-calibration-batches", type=int, default=8, metavar="N",
                   help="after QAT, compare each layer's static and dynamic per-token activation "
                        "quantization error on N training batches; layers whose static range outliers "
                        "have stretched run dynamic per token (sparse_ofa.training.outliers). 0: static everywhere")
    _shared.add_common_training_args(p, lr=1e-5, steps=500)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import save_pretrained, summarize
    from ..tasks.data import task_model_class
    from ..tasks.evaluation import task_metrics
    from ..training.ddp import is_main_process
    from ..training.qat import QATConfig, convert_qat

    qat_config = QATConfig(weight_granularity=args.weight_granularity, activation=args.activation,
                           ema_decay=args.ema_decay)
    state = train_task(args, "quantize", qat_config=qat_config)
    if not is_main_process():  # under torchrun rank 0 alone converts, evaluates and writes
        return 0
    student, output, tokenizer = state["student"], state["output"], state["tokenizer"]
    fake_metrics = metrics = None
    if state["evaluation"]:
        fake_metrics = task_metrics(student, args.task, state["evaluation"], tokenizer, args.max_length)
        print(f"{args.task} {args.eval_split}, fake-quant: " + ", ".join(f"{k} {v:.4f}" for k, v in fake_metrics.items()))
    dynamic = _outlier_layers(student, state["loader"], args.outlier_calibration_batches)
    convert_qat(student.eval(), backend=args.backend, dynamic=dynamic)
    report = summarize(student)
    print(report)
    if state["evaluation"]:
        metrics = task_metrics(student, args.task, state["evaluation"], tokenizer, args.max_length)
        print(f"{args.task} {args.eval_split}, sparse INT8: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    save_pretrained(student, output)
    tokenizer.save_pretrained(output)
    _shared.write_run_config(output, "quantize", args,
                             device=next(student.parameters()).device, metrics=metrics, fake_quant_metrics=fake_metrics,
                             sparsity=report.sparsity, masks_identical=state["masks_identical"],
                             packed_bytes=report.packed_bytes, dense_bytes=report.dense_bytes,
                             steps_done=state["result"].step, dynamic_per_token_layers=dynamic,
                             qat=vars(qat_config) if hasattr(qat_config, "__dict__") else str(qat_config))
    print(f"saved the packed sparse INT8 model to {output}; load it with sparse_ofa.from_pretrained("
          f"{str(output)!r}, model_class={task_model_class(args.task).__name__})")
    return 0


def _outlier_layers(student, loader, n_batches: int) -> list[str]:
    """Layers to convert with dynamic per-token activations: static error >> dynamic on n_batches."""
    if n_batches < 0:
        raise ValueError(f"--outlier-calibration-batches must be >= 0, got {n_batches}")
    if n_batches == 0:
        return []
    import itertools

    from ..training.outliers import outlier_layers, static_vs_dynamic_error

    device = next(student.parameters()).device
    batches = ({k: v.to(device) for k, v in batch.items()} for batch in itertools.islice(iter(loader), n_batches))
    dynamic = outlier_layers(static_vs_dynamic_error(student, batches))  # (runs under no_grad itself)
    print(f"layers whose static activation range outliers stretched (converted with dynamic per-token "
          f"activations): {', '.join(dynamic) if dynamic else 'none'}")
    return dynamic
