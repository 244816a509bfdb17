"""`sparse-ofa demo --quick`: the whole pipeline on the real all-MiniLM-L6-v2 with tiny numbers. Checks
that the report is complete and internally consistent (not the quality goal: that needs the full run)."""
import json
from pathlib import Path

import pytest
import torch

from sparse_ofa.cli import main


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    return json.loads((out / "report.json").read_text()), out


def test_report_is_complete_and_consistent(report):
    rep, out = report
    cfg = rep["config"]
    assert cfg["quick"] and cfg["sparsity"] == 0.9 and cfg["pattern"] == "unstructured"
    assert rep["corpus"]["train"] == cfg["n_train"] and rep["corpus"]["heldout"] == cfg["n_heldout"]

    # the history covers every step; GMP reaches the target inside the prune phase and QAT keeps it
    hist = rep["history"]
    assert [h["phase"] for h in hist] == ["prune"] * cfg["steps"] + ["qat"] * cfg["qat_steps"]
    sparsities = [h["sparsity"] for h in hist]
    assert sparsities == sorted(sparsities) and sparsities[0] == 0.0
    assert sparsities[cfg["steps"] - 1] == pytest.approx(0.9)
    assert all(-1.0 <= h["batch_cosine"] <= 1.0 + 1e-5 for h in hist)

    # every swapped layer runs at the target sparsity (INT8 rounding may only add zeros)
    sp = rep["sparsity"]
    assert len(sp["layers"]) == 36  # 6 layers x (q, k, v, attention output, intermediate, output)
    assert all(0.9 - 1e-4 <= s < 0.93 for s in sp["layers"].values())  # round(0.9 * n) pruned
    assert sp["pattern_lock_held_through_qat"] is True
    aq = rep["activation_quantization"]  # per layer: static vs dynamic input-quantization error
    assert set(aq["static_vs_dynamic_error"]) == set(sp["layers"])
    assert all(e["static"] >= 0 and e["dynamic"] >= 0 for e in aq["static_vs_dynamic_error"].values())
    assert set(aq["dynamic_per_token_layers"]) <= set(sp["layers"])

    q = rep["quality_vs_teacher"]
    assert set(q) == {"prune_ofa_fp32", "prune_ofa_sparse_int8", "oneshot_fp32", "oneshot_sparse_int8", "dense_int8"}
    for name, row in q.items():
        assert -1.0 <= row["min_cosine"] <= row["p05_cosine"] <= row["mean_cosine"] <= 1.0, name
        assert 0.0 <= row["top1"] <= 1.0 and 0.0 <= row["top5_overlap"] <= 1.0, name
    # INT8 of the same sparse weights stays close to its fp32 model; dense INT8 is near the teacher
    assert abs(q["oneshot_sparse_int8"]["mean_cosine"] - q["oneshot_fp32"]["mean_cosine"]) < 0.1
    assert q["dense_int8"]["mean_cosine"] > 0.85
    assert rep["goal"]["met"] == (q["prune_ofa_sparse_int8"]["mean_cosine"] >= 0.95)

    s = rep["speed"]
    ms = s["median_ms"]
    assert set(ms) == {"dense_fp32", "dense_int8", "sparse_int8"} and all(v > 0 for v in ms.values())
    assert s["speedup_sparse_int8_vs_dense_fp32"] == pytest.approx(ms["dense_fp32"] / ms["sparse_int8"])
    assert s["speedup_sparse_int8_vs_dense_int8"] == pytest.approx(ms["dense_int8"] / ms["sparse_int8"])
    assert 1 <= s["seq"] <= 128 and s["batch"] == cfg["speed_batch"]
    one = s["single_sentence"]  # one query at a time: batch 1, timed for the same three models
    assert set(one["median_ms"]) == set(ms) and all(v > 0 for v in one["median_ms"].values())
    assert 3 <= one["seq"] <= s["seq"] and one["repeats"] == 5 * cfg["speed_repeats"]
    assert one["speedup_sparse_int8_vs_dense_int8"] == pytest.approx(
        one["median_ms"]["dense_int8"] / one["median_ms"]["sparse_int8"])
    assert rep["timings_s"]["total"] >= rep["timings_s"]["prune_ofa"] > 0

    # the LR follows the GMP target through the ramp (lr_schedule "sparsity"): gentle first, full at the end
    ramp = [h["lr"] for h in hist if h["phase"] == "prune"][:round(cfg["ramp_fraction"] * cfg["steps"])]
    assert cfg["lr_schedule"] == "sparsity" and ramp == sorted(ramp)
    assert ramp[0] < 0.5 * cfg["lr"] and ramp[-1] == pytest.approx(cfg["lr"])

    # STS-B dev (64 pairs in a quick run) where ../shared/data/stsb is present, else said absent
    st = rep["stsb"]
    from sparse_ofa.tasks.evaluation import default_stsb_dir

    if default_stsb_dir() is None:
        assert st["available"] is False and "STS-B" in st["reason"]
    else:
        scores = st["spearman_x100"]
        assert st["available"] is True and st["pairs"] == 64
        assert set(scores) == {"teacher", "prune_ofa_sparse_int8", "oneshot_sparse_int8"}
        assert all(-100.0 <= v <= 100.0 for v in scores.values())
        assert scores["teacher"] > scores["oneshot_sparse_int8"] + 10  # 90 % one-shot breaks MiniLM
        assert st["goal"]["min"] == 84.7 and st["goal"]["met"] == (scores["prune_ofa_sparse_int8"] >= 84.7)

    # the sparse pre-trained student that `sparse-ofa finetune` starts from
    from transformers import AutoModel

    student = AutoModel.from_pretrained(out / "student", local_files_only=True)
    weights = [m.weight for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]
    assert len(weights) == 36 and all(float((w == 0).float().mean()) == pytest.approx(0.9, abs=1e-3) for w in weights)
    assert (out / "student" / "tokenizer.json").exists()

    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_bad_demo_arguments_are_named(tmp_path, capsys):
    assert main(["demo", "--quick", "--sparsity", "1.0", "--output", str(tmp_path)]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert main(["demo", "--quick", "--steps", "0", "--output", str(tmp_path)]) == 2
    assert "steps must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_bf16_default_and_step_defaults(monkeypatch):
    from sparse_ofa.demo import run as demo

    assert demo.DemoConfig(bf16=False).steps == 1600 and demo.DemoConfig(bf16=False).update_every == 20
    cfg = demo.DemoConfig(bf16=True)
    assert cfg.steps == 2500 and cfg.update_every == 31  # ~80 mask updates either way
    assert demo.DemoConfig(bf16=True, steps=500).update_every == 6
    monkeypatch.setattr(demo, "cpu_has_bf16", lambda: False)
    assert demo.DemoConfig().bf16 is False and demo.DemoConfig().steps == 1600
    monkeypatch.setattr(demo, "cpu_has_bf16", lambda: True)
    assert demo.DemoConfig().bf16 is True


def _tiny_minilm_shaped_teacher():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64), add_pooling_layer=False).eval()


def test_eager_attention_is_restored_even_after_an_error():
    import pytest

    from sparse_ofa.training.encoder_recipe import eager_attention

    model = _tiny_minilm_shaped_teacher()
    model.set_attn_implementation("sdpa")
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(KeyError), eager_attention(model):
        raise KeyError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_stsb_scores_report_missing_data_and_goals(tmp_path):
    from sparse_ofa.demo.run import DemoConfig, _stsb_scores
    from sparse_ofa.models.minilm import load_minilm

    model, tokenizer = load_minilm()
    models = {"teacher": model, "prune_ofa_sparse_int8": model, "oneshot_sparse_int8": model}
    logged = []
    missing = _stsb_scores(DemoConfig(bf16=False, stsb=str(tmp_path / "nowhere")), models, tokenizer, logged.append)
    assert missing["available"] is False and "nowhere" in missing["reason"] and "--stsb DIR" in missing["reason"]
    assert any("not evaluated" in line for line in logged)
    assert _stsb_scores(DemoConfig(bf16=False, stsb=""), models, tokenizer, print)["available"] is False
    fixture = Path(__file__).parent / "data" / "stsb_fixture"
    got = _stsb_scores(DemoConfig(bf16=False, stsb=str(fixture), sparsity=0.8), models, tokenizer, print)
    scores = got["spearman_x100"]
    assert got["pairs"] == 36 and len(set(scores.values())) == 1  # one model under three names
    assert got["goal"] == {"min": 85.7, "met": scores["teacher"] >= 85.7}
    assert _stsb_scores(DemoConfig(bf16=False, stsb=str(fixture), sparsity=0.7), models, tokenizer,
                        print)["goal"] == {"min": None, "met": None}


def test_bad_corpus_and_schedule_are_named():
    from sparse_ofa.demo.run import DemoConfig

    with pytest.raises(ValueError, match="corpus must be"):
        DemoConfig(bf16=False, corpus="wiki")
    with pytest.raises(ValueError, match="lr_schedule must be"):
        DemoConfig(bf16=False, lr_schedule="cosine")


def test_steps_within_budget_leaves_room_for_qat_and_evaluation():
    from sparse_ofa.demo.run import (EVALUATION_STEPS, MIN_FITTED_STEPS, QAT_STEP_COST, STEP_DRIFT,
                                     steps_within_budget)

    # 600 s budget, 20 s gone, 0.3 s per probed step, 60 QAT steps: what is left, at the drifted step
    left = 0.95 * 600 - 20 - 0.3 * (QAT_STEP_COST * 60 + EVALUATION_STEPS)
    assert steps_within_budget(600, 20, 0.3, 60, 5000) == int(left / (STEP_DRIFT * 0.3)) < 5000
    assert steps_within_budget(600, 20, 0.1, 60, 1600) == 1600           # a fast machine runs the default
    assert steps_within_budget(600, 590, 0.3, 60, 1600) == MIN_FITTED_STEPS  # never fewer than this


def test_fit_steps_times_real_steps_and_respects_the_default():
    from sparse_ofa.demo.run import MIN_FITTED_STEPS, DemoConfig, fit_steps, steps_within_budget
    from sparse_ofa.models.minilm import load_minilm
    from sparse_ofa.tasks.corpus import sample_sentences

    teacher, tokenizer = load_minilm()
    cfg = DemoConfig(bf16=False, batch_size=4, max_length=32, budget_minutes=0.5)
    assert not cfg.steps_given and DemoConfig(steps=50).steps_given
    fitted = fit_steps(cfg, teacher, tokenizer, sample_sentences(40), None, elapsed_s=1.0, probe_steps=5)
    assert fitted["step_ms"] > 0 and fitted["default_steps"] == cfg.steps == 1600 and fitted["budget_s"] == 30.0
    # the count follows from the measured step (30 s hold at most a few dozen real steps: the floor)
    assert MIN_FITTED_STEPS <= fitted["steps"] <= steps_within_budget(30.0, 1.0, fitted["step_ms"] / 1000, 60, 1600)
    assert fitted["steps"] == MIN_FITTED_STEPS
    with pytest.raises(ValueError, match="budget_minutes must be > 0"):
        DemoConfig(budget_minutes=0)
