"""DDP: 2 CPU processes (gloo) prune with distillation; masks and weights identical on every rank."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # the environment torchrun would set up
    os.environ.update(HF_HUB_OFFLINE="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sparse_ofa.training.ddp import setup_distributed, shard, wrap_ddp

    device = setup_distributed("gloo")
    assert dist.is_initialized() and dist.get_world_size() == world
    try:
        from transformers import BertConfig, BertForMaskedLM

        from sparse_ofa.training.pruning import GMPSchedule, Pruner
        from sparse_ofa.training.loop import train_prune_ofa

        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
        torch.manual_seed(0)
        teacher = BertForMaskedLM(cfg)
        torch.manual_seed(100 + rank)  # different local inits: DDP must broadcast rank 0's
        student = wrap_ddp(BertForMaskedLM(cfg), device)
        g = torch.Generator().manual_seed(0)
        all_batches = []
        for _ in range(6):
            ids = torch.randint(5, 100, (2, 8), generator=g)
            all_batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        batches = shard(all_batches)  # each rank sees its own half of the data
        assert len(batches) == 3 and torch.equal(batches[0]["input_ids"], all_batches[rank]["input_ids"])
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
        pruner = Pruner(student, GMPSchedule(0.6, ramp_steps=4, update_every=2), pattern="1x4")
        train_prune_ofa(student, teacher, batches, optimizer=opt, pruner=pruner, steps=6, progress=False,
                        checkpoint_dir=os.path.join(out_dir, "ckpt"), checkpoint_every=3)
        torch.save({"masks": pruner.masks, "weights": student.module.state_dict(), "report": pruner.report()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_masks_identical(tmp_path):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["masks"].keys() == r1["masks"].keys() and len(r0["masks"]) == 12
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert abs(r0["report"][name] - 0.6) < 0.01
    for key in r0["weights"]:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key
    # checkpoints were written once (rank 0) with one RNG file per rank
    for step in (3, 6):
        ckpt = tmp_path / "ckpt" / f"step-{step:08d}"
        assert sorted(p.name for p in ckpt.iterdir()) == ["rng-rank0.pt", "rng-rank1.pt", "state.pt"]


@pytest.mark.parametrize("head", ["mlm", "encoder"])
def test_torchrun_runs_the_prune_command_as_one_ddp_group(tmp_path, head):
    """`torchrun --nproc_per_node 2 -m sparse_ofa.cli prune ...` on CPU (gloo), for an MLM teacher and
    for a sentence encoder (the encoder recipe): both processes train in one group (a checkpoint holds
    both ranks' RNG files), rank 0 alone writes the student, and its layers end at the target sparsity."""
    import json
    import subprocess
    import sys

    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    from sparse_ofa.tasks.corpus import sample_sentences
    from sparse_ofa.models.minilm import minilm_path
    from sparse_ofa.training.pruning import weight_sparsity

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    model_class = BertForMaskedLM if head == "mlm" else BertModel
    model_class(config).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "text.txt").write_text("\n".join(sample_sentences(32)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "student"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "sparse_ofa.cli", "prune", str(tmp_path / "teacher"), str(out),
           "--data", str(tmp_path / "text.txt"), "--steps", "4", "--ramp-steps", "3", "--update-every", "1",
           "--sparsity", "0.75", "--pattern", "1x4", "--batch-size", "4", "--max-length", "32",
           "--checkpoint-every", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["world_size"] == 2 and run_config["steps_done"] == 4
    assert run_config["objective"] == ("mlm" if head == "mlm" else "embedding")
    last = out / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in last.iterdir()) == ["rng-rank0.pt", "rng-rank1.pt", "state.pt"]
    student = model_class.from_pretrained(out, local_files_only=True)
    layers = {n: s for n, s in weight_sparsity(student).items() if "encoder.layer." in n}
    assert len(layers) == 12 and all(abs(s - 0.75) < 1e-6 for s in layers.values()), layers
