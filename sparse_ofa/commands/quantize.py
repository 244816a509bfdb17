"""`sparse-ofa quantize MODEL OUTPUT --task sst2 --data-dir DIR`: quantization-aware training of a
sparse fine-tuned model, then conversion to packed sparse INT8.

Q8BERT-style QAT (fake-quant Linear: int8 symmetric weights, per channel by default; activations with
EMA observers, uint8 asymmetric by default) with pattern lock and distillation (--teacher) still on;
then every fake-quant layer becomes a SparseInt8Linear carrying its learned static activation scale.
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
    _shared.add_common_training_args(p, lr=1e-5, steps=500)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import save_pretrained, summarize
    from ..qat import QATConfig, convert_qat

    qat_config = QATConfig(weight_granularity=args.weight_granularity, activation=args.activation,
                           ema_decay=args.ema_decay)
    state = train_task(args, "quantize", qat_config=qat_config)
    if not _shared.is_main_process():  # under torchrun rank 0 alone converts, evaluates and writes
        return 0
    student, output, tokenizer = state["student"], state["output"], state["tokenizer"]
    fake_metrics = metrics = None
    if state["evaluation"]:
        fake_metrics = _shared.evaluate(student, args.task, state["evaluation"], tokenizer, args.max_length)
        print(f"{args.task} validation, fake-quant: " + ", ".join(f"{k} {v:.4f}" for k, v in fake_metrics.items()))
    convert_qat(student.eval(), backend=args.backend)
    report = summarize(student)
    print(report)
    if state["evaluation"]:
        metrics = _shared.evaluate(student, args.task, state["evaluation"], tokenizer, args.max_length)
        print(f"{args.task} validation, sparse INT8: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    save_pretrained(student, output)
    tokenizer.save_pretrained(output)
    _shared.write_run_config(output, "quantize", args,
                             device=next(student.parameters()).device, metrics=metrics, fake_quant_metrics=fake_metrics,
                             sparsity=report.sparsity, masks_identical=state["masks_identical"],
                             packed_bytes=report.packed_bytes, dense_bytes=report.dense_bytes,
                             steps_done=state["result"].step, qat=vars(qat_config) if hasattr(qat_config, "__dict__") else str(qat_config))
    print(f"saved the packed sparse INT8 model to {output}; load it with sparse_ofa.from_pretrained("
          f"{str(output)!r}, model_class={_shared.task_model_class(args.task).__name__})")
    return 0
