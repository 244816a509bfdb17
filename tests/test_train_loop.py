"""The plain training loop: GMP + KD, exact resume, lock + QAT, and errors before any step."""
import copy

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from sparse_ofa import SparseInt8Linear
from sparse_ofa.training.distill import DistillLoss
from sparse_ofa.training.lock import PatternLock
from sparse_ofa.training.pruning import GMPSchedule, Pruner
from sparse_ofa.training.qat import FakeQuantLinear, convert_qat, prepare_qat
from sparse_ofa.training.loop import latest_checkpoint, train_prune_ofa

CFG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           max_position_embeddings=64)


def tiny_mlm(**overrides):
    return BertForMaskedLM(BertConfig(**dict(CFG, **overrides)))


def make_batches(n=5, batch=4, length=10):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 100, (batch, length), generator=g)
        attention = torch.ones(batch, length, dtype=torch.long)
        attention[0, 7:] = 0
        labels = torch.full_like(ids, -100)
        labels[:, 2] = ids[:, 2]
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


def masking_loader(seed=5):
    """Shuffled DataLoader with its own generator whose collate masks from the global RNG (like MLM)."""
    g = torch.Generator().manual_seed(11)
    examples = [{"input_ids": torch.randint(5, 100, (10,), generator=g)} for _ in range(12)]

    def collate(items):
        ids = torch.stack([it["input_ids"] for it in items])
        labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return torch.utils.data.DataLoader(examples, batch_size=4, shuffle=True, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(seed))


def build(init_state, teacher_state):
    student, teacher = tiny_mlm(), tiny_mlm()
    student.load_state_dict(init_state)
    teacher.load_state_dict(teacher_state)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 20)
    pruner = Pruner(student, GMPSchedule(0.5, ramp_steps=4, update_every=2), pattern="1x4", rewind_lr=True)
    return student, teacher, opt, sched, pruner


@pytest.mark.parametrize("data, split", [("list", 3), ("loader", 4)])
def test_resume_is_exact(tmp_path, data, split):
    """N straight steps == split steps + checkpoint + resume to N: same losses, weights, masks, LR.
    list: 5 batches, resume mid-epoch; loader: 3 shuffled batches per epoch from its own generator,
    labels masked from the global RNG (like MLM collation), resume mid-epoch."""
    init, teach = tiny_mlm().state_dict(), tiny_mlm().state_dict()
    make = make_batches if data == "list" else masking_loader

    torch.manual_seed(1)
    student, teacher, opt, sched, pruner = build(init, teach)
    straight = train_prune_ofa(student, teacher, make(), optimizer=opt, scheduler=sched, pruner=pruner,
                               steps=7, progress=False)

    torch.manual_seed(1)
    s2, t2, o2, sc2, p2 = build(init, teach)
    first = train_prune_ofa(s2, t2, make(), optimizer=o2, scheduler=sc2, pruner=p2, steps=split,
                            checkpoint_dir=tmp_path, progress=False)
    assert first.last_checkpoint == latest_checkpoint(tmp_path)
    torch.manual_seed(12345)  # the resumed run must restore the RNG itself (dropout is on)
    s3, t3, o3, sc3, p3 = build(init, teach)
    rest = train_prune_ofa(s3, t3, make(), optimizer=o3, scheduler=sc3, pruner=p3, steps=7,
                           checkpoint_dir=tmp_path, resume=True, progress=False)
    assert rest.step == 7 and len(rest.losses) == 7 - split
    assert first.losses + rest.losses == straight.losses
    for (name, a), (_, b) in zip(student.state_dict().items(), s3.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(torch.equal(pruner.masks[n], p3.masks[n]) for n in pruner.masks)
    assert o3.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_prune_with_kd_reaches_exact_sparsity_and_loss_is_kd():
    torch.manual_seed(0)
    teacher, student = tiny_mlm(), tiny_mlm()
    student.load_state_dict(teacher.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    pruner = Pruner(student, GMPSchedule(0.8, ramp_steps=4, update_every=2))
    calls = []

    class Spy(DistillLoss):
        def __call__(self, s, t, hard, mask):
            calls.append((hard is not None, mask is not None))
            return super().__call__(s, t, hard, mask)

    result = train_prune_ofa(student, teacher, make_batches(3), optimizer=opt, pruner=pruner, steps=5,
                             distill=Spy(), progress=False)
    assert calls == [(True, True)] * 5 and len(result.losses) == 5
    for name, layer in pruner.layers.items():
        units = layer.weight.numel() // 1
        assert float((layer.weight == 0).sum()) >= round(0.8 * units)
        assert pruner.report()[name] == pytest.approx(round(0.8 * units) / units)
    # the teacher is untouched by training
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), tiny_mlm_copy(teacher).parameters()))


def tiny_mlm_copy(model):
    return copy.deepcopy(model)


def test_prune_then_finetune_with_lock_then_qat_then_convert():
    torch.manual_seed(0)
    teacher = tiny_mlm()
    student = copy.deepcopy(teacher)
    batches = make_batches(3)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    pruner = Pruner(student, GMPSchedule(0.75, ramp_steps=2, update_every=1), pattern="1x4")
    train_prune_ofa(student, teacher, batches, optimizer=opt, pruner=pruner, steps=3, progress=False)
    pruner.remove_hooks()

    lock = PatternLock(student)
    masks = {n: m.clone() for n, m in lock.masks.items()}
    assert all(torch.equal(masks[n], pruner.masks[n]) for n in masks)
    prepare_qat(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    train_prune_ofa(student, teacher, batches, optimizer=opt, lock=lock, steps=3, progress=False)
    for name, mask in masks.items():
        assert torch.equal(student.get_submodule(name).weight != 0, mask), name

    student.eval()
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        fake = student(input_ids=ids).logits
    convert_qat(student, backend="reference")
    assert not any(isinstance(m, FakeQuantLinear) for m in student.modules())
    converted = [m for m in student.modules() if isinstance(m, SparseInt8Linear)]
    assert len(converted) == 12 and all(m.act.is_static for m in converted)  # BertForMaskedLM: no pooler
    assert all(m.pattern == "1x4" and m.sparsity == pytest.approx(0.75) for m in converted)
    with torch.no_grad():
        real = student(input_ids=ids).logits
    assert (real - fake).abs().max() / fake.abs().max() < 1e-5


def test_bad_input_fails_before_any_step(tmp_path):
    student = tiny_mlm()
    before = copy.deepcopy(student.state_dict())
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    batches = make_batches(2)
    with pytest.raises(ValueError, match="vocabulary size"):
        train_prune_ofa(student, tiny_mlm(vocab_size=120), batches, optimizer=opt, steps=2, progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        train_prune_ofa(student, None, (b for b in batches), optimizer=opt, steps=2, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_prune_ofa(student, None, batches, optimizer=opt, steps=-1, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train_prune_ofa(student, None, batches, optimizer=opt, steps=2, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train_prune_ofa(student, None, batches, optimizer=opt, steps=2, checkpoint_dir=tmp_path,
                        resume=tmp_path / "step-00000001", progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_prune_ofa(student, None, [], optimizer=opt, steps=2, progress=False)
    # the empty-batches case is the only one that gets as far as the data; nothing trained anywhere
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prune_ofa_loop_and_resume_on_cuda(tmp_path):
    init, teach = tiny_mlm().state_dict(), tiny_mlm().state_dict()

    def run(steps, checkpoint_dir, resume, seed):
        torch.manual_seed(seed)
        student, teacher = tiny_mlm().cuda(), tiny_mlm().cuda()
        student.load_state_dict(init)
        teacher.load_state_dict(teach)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
        pruner = Pruner(student, GMPSchedule(0.5, ramp_steps=4, update_every=2), pattern="1x4")
        train_prune_ofa(student, teacher, make_batches(), optimizer=opt, pruner=pruner, steps=steps,
                        checkpoint_dir=checkpoint_dir, resume=resume, progress=False)
        return student, pruner

    straight, _ = run(6, None, False, 1)
    run(3, tmp_path, False, 1)
    resumed, pruner = run(6, tmp_path, True, 99)
    assert all(m.is_cuda for m in pruner.masks.values())
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_without_dropout_only_the_qat_observers_train_and_on_step_sees_every_step():
    """dropout=False: the student runs in eval mode, the FakeQuantLinear observers in train mode (their
    activation ranges move); on_step hears each step with its loss and the LR that step used."""
    torch.manual_seed(0)
    student = tiny_mlm()
    prepare_qat(student)
    observers = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    modes, seen = [], []

    def loss_fn(model, teacher, batch, distill):
        modes.append((model.training, model.bert.encoder.layer[0].attention.self.dropout.training,
                      all(m.training for m in observers)))
        return model(**batch).loss

    result = train_prune_ofa(student, None, make_batches(2), optimizer=opt, scheduler=sched, steps=3,
                             loss_fn=loss_fn, progress=False, dropout=False, on_step=seen.append)
    assert modes == [(False, False, True)] * 3
    assert [(i.step, i.loss, i.lr) for i in seen] == list(zip(range(3), result.losses, [0.1, 0.05, 0.1 / 3]))
    assert all(bool(m.act_observed) and float(m.act_max) > float(m.act_min) for m in observers)
