"""HF Trainer integration: PruningCallback + DistillationTrainer, PatternLockCallback, resume."""
import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from sparse_ofa import magnitude_prune_
from sparse_ofa.training.callbacks import PRUNER_STATE_FILE, DistillationTrainer, PatternLockCallback, PruningCallback
from sparse_ofa.training.distill import DistillLoss
from sparse_ofa.training.lock import PatternLock
from sparse_ofa.training.pruning import GMPSchedule, Pruner


def tiny_classifier(**overrides):
    cfg = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(BertConfig(**dict(cfg, **overrides)))


def dataset(n=16, length=8):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 100, (n, length), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "labels": torch.tensor(int(ids[i, 0]) % 2)} for i in range(n)]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                report_to=[], save_strategy="steps", save_steps=3, logging_steps=100, disable_tqdm=True,
                use_cpu=True, dataloader_num_workers=0, seed=0, save_only_model=False)
    base.update(kw)
    return TrainingArguments(**base)


def run_pruning(tmp_path, teacher, init_state, resume=None):
    student = tiny_classifier()
    student.load_state_dict(init_state)
    pruner = Pruner(student, GMPSchedule(0.75, ramp_steps=4, update_every=2), pattern="1x4")
    trainer = DistillationTrainer(model=student, args=args(tmp_path), train_dataset=dataset(), teacher=teacher,
                                  distill_loss=DistillLoss(), callbacks=[PruningCallback(pruner)])
    trainer.train(resume_from_checkpoint=resume)
    return student, pruner


def test_pruning_callback_with_distillation_trainer(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_classifier()
    teacher_before = copy.deepcopy(teacher.state_dict())
    student, pruner = run_pruning(tmp_path, teacher, teacher.state_dict())
    assert pruner.last_update == 4
    for name, layer in pruner.layers.items():  # classifier head never pruned, pooler is
        blocks = layer.weight.numel() // 4
        assert pruner.report()[name] == pytest.approx(round(0.75 * blocks) / blocks)
        assert bool((layer.weight[~pruner.masks[name]] == 0).all())
    assert "bert.pooler.dense" in pruner.masks and "classifier" not in pruner.masks
    assert (tmp_path / "checkpoint-3" / PRUNER_STATE_FILE).exists()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())

    # the saved state is what a resumed callback loads (at step 3 the last mask update was step 2)
    from transformers import TrainerControl, TrainerState
    fresh = Pruner(tiny_classifier(), GMPSchedule(0.75, ramp_steps=4, update_every=2), pattern="1x4")
    saved = torch.load(tmp_path / "checkpoint-3" / PRUNER_STATE_FILE, weights_only=False)
    PruningCallback(fresh).on_train_begin(args(tmp_path), TrainerState(global_step=3), TrainerControl())
    assert fresh.last_update == 2 and fresh.current_sparsity == pytest.approx(GMPSchedule(0.75, ramp_steps=4).sparsity_at(2))
    assert all(torch.equal(fresh.masks[n], saved["masks"][n]) for n in saved["masks"])
    assert bool((fresh.report()["bert.pooler.dense"] > 0))

    # resume from step 3 with fresh objects: the pruner picks up its saved state and ends identically
    student_r = tiny_classifier()
    student_r.load_state_dict(teacher_before)
    pruner_r = Pruner(student_r, GMPSchedule(0.75, ramp_steps=4, update_every=2), pattern="1x4")
    trainer = DistillationTrainer(model=student_r, args=args(tmp_path), train_dataset=dataset(),
                                  teacher=teacher, callbacks=[PruningCallback(pruner_r)])
    # a copy outside output_dir: only DistillationTrainer.train telling the callback finds its state
    import shutil
    elsewhere = tmp_path.parent / "moved-checkpoint-3"
    shutil.copytree(tmp_path / "checkpoint-3", elsewhere)
    (tmp_path / "checkpoint-3" / PRUNER_STATE_FILE).unlink()
    loaded = []
    original_load = pruner_r.load_state_dict
    pruner_r.load_state_dict = lambda state: (loaded.append(state["last_update"]), original_load(state))
    trainer.train(resume_from_checkpoint=str(elsewhere))
    assert loaded == [2] and pruner_r.last_update == 4
    assert all(torch.equal(pruner_r.masks[n], pruner.masks[n]) for n in pruner.masks)
    for (name, a), (_, b) in zip(student.state_dict().items(), student_r.state_dict().items()):
        assert torch.equal(a, b), name


def test_pattern_lock_callback_keeps_masks(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_classifier()
    student = copy.deepcopy(teacher)
    magnitude_prune_(student, 0.8)
    lock = PatternLock(student)
    masks = {n: m.clone() for n, m in lock.masks.items()}
    before = copy.deepcopy(student.state_dict())
    trainer = DistillationTrainer(model=student, args=args(tmp_path, max_steps=4, save_strategy="no"),
                                  train_dataset=dataset(), teacher=teacher, callbacks=[PatternLockCallback(lock)])
    trainer.train()
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(before[key], student.state_dict()[key])
    for name, mask in masks.items():
        assert torch.equal(student.get_submodule(name).weight != 0, mask), name


def test_distillation_trainer_rejects_mismatched_teacher(tmp_path):
    with pytest.raises(ValueError, match="num_labels"):
        DistillationTrainer(model=tiny_classifier(), args=args(tmp_path), train_dataset=dataset(),
                            teacher=tiny_classifier(num_labels=3))
    with pytest.raises(TypeError, match="Pruner"):
        PruningCallback(object())
