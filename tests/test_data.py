"""Local GLUE / SQuAD / text loading, their metrics and the clear errors for missing data."""
import json
from pathlib import Path

import pytest
import torch

from sparse_ofa.tasks import data, metrics

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """all-MiniLM-L6-v2's own WordPiece tokenizer (fast), read from the installed package offline."""
    from transformers import AutoTokenizer

    from sparse_ofa.models.minilm import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def test_sst2_from_original_glue_tsv_folder():
    train = data.load_glue("sst2", "train", DATA / "glue_sst2")
    assert len(train) == 8
    assert train[0] == {"text_a": "a gripping , funny and deeply moving film ", "text_b": None, "label": 1}
    dev = data.load_glue("sst2", "validation", DATA / "glue_sst2")  # found as dev.tsv
    assert [e["label"] for e in dev] == [1, 0, 1, 0]
    assert dev[0]["text_a"].startswith('a small , "perfect" gem')  # QUOTE_NONE keeps the quotes


def test_mnli_hf_jsonl_and_original_tsv_agree_on_schema():
    train = data.load_glue("mnli", "train", DATA / "glue_mnli")
    assert train[1] == {"text_a": "A man is playing a guitar on stage.",
                        "text_b": "The man is asleep at home.", "label": 2}
    dev = data.load_glue("mnli", "validation", DATA / "glue_mnli")  # dev_matched.tsv, string labels
    assert [e["label"] for e in dev] == [0, 2, 1]
    assert dev[0]["text_b"] == "The dog made a noise."


def test_qqp_and_qnli_from_csv_files(tmp_path):
    (tmp_path / "qqp.csv").write_text("question1,question2,label\n\"How do I cook rice?\",How to cook rice,1\n"
                                      "What is love?,Where is Paris?,0\n")
    qqp = data.load_glue("qqp", "train", tmp_path / "qqp.csv")
    assert [(e["text_a"], e["label"]) for e in qqp] == [("How do I cook rice?", 1), ("What is love?", 0)]
    (tmp_path / "train.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tWho?\tHe did.\tentailment\n"
                                        "1\tWhen?\tBlue.\tnot_entailment\n")
    assert [e["label"] for e in data.load_glue("qnli", "train", tmp_path)] == [0, 1]


def test_glue_bad_rows_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence": "fine", "label": 7}) + "\n")
    with pytest.raises(ValueError, match=r"label 7 outside 0\.\.1"):
        data.load_glue("sst2", "train", bad)
    bad.write_text(json.dumps({"premise": "only one side", "label": 0}) + "\n")
    with pytest.raises(ValueError, match="missing \\['hypothesis'\\]"):
        data.load_glue("mnli", "train", bad)
    with pytest.raises(ValueError, match="unknown classification task 'cola'"):
        data.load_glue("cola", "train", bad)


def test_squad_official_json_and_answer_positions():
    train = data.load_squad("train", DATA / "squad")
    assert [q["id"] for q in train] == ["t1", "t2", "t3", "t4", "t5"]
    q = train[0]
    start = q["answers"]["answer_start"][0]
    assert q["context"][start:start + len(q["answers"]["text"][0])] == "Guido van Rossum"
    dev = data.load_squad("validation", DATA / "squad")  # dev-v1.1.json
    assert dev[0]["answers"]["text"] == ["1937", "in 1937"]


def test_squad_rejects_misplaced_answer(tmp_path):
    row = {"id": "x", "question": "q?", "context": "abc def", "answers": {"text": ["def"], "answer_start": [0]}}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="not at character 0"):
        data.load_squad("train", tmp_path)


def test_missing_data_offline_names_dataset_and_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(data.DataNotFoundError, match=r"GLUE qnli \(split 'train'\).*--data-dir.*load_dataset"):
        data.load_glue("qnli", "train")
    with pytest.raises(data.DataNotFoundError, match="no file for split 'validation'"):
        data.load_squad("validation", tmp_path)
    with pytest.raises(data.DataNotFoundError, match="no such file or folder"):
        data.load_text(str(tmp_path / "nope.txt"))


def test_text_sources_and_save_to_disk(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n\nSecond document.\n")
    assert data.load_text(str(tmp_path / "a.txt")) == ["First document.", "Second document."]
    (tmp_path / "b.jsonl").write_text('{"body": "x y"}\n{"body": "z"}\n')
    assert data.load_text(str(tmp_path / "b.jsonl"), text_column="body") == ["x y", "z"]
    with pytest.raises(ValueError, match="no column 'text'"):
        data.load_text(str(tmp_path / "b.jsonl"))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["saved one", "saved two"]}).save_to_disk(str(tmp_path / "saved"))
    assert data.load_text(str(tmp_path / "saved")) == ["saved one", "saved two"]


def test_mlm_collation_masks_only_real_tokens(minilm_tokenizer):
    feats = data.tokenize_texts(["the cat sat on the mat", "a much longer sentence about the dog and "
                                 "the cat and the mat"] * 8, minilm_tokenizer, max_length=32)
    batch = data.mlm_collator(minilm_tokenizer, 0.5)(feats)
    labels, ids = batch["labels"], batch["input_ids"]
    assert labels.shape == ids.shape
    picked = labels != -100
    assert picked.any()
    assert not picked[batch["attention_mask"] == 0].any()          # never padding
    assert not picked[:, 0].any()                                   # never [CLS]
    assert (ids[picked] == minilm_tokenizer.mask_token_id).float().mean() > 0.5  # mostly [MASK]


DOCS = ["The cat sat. It was happy! Then it slept.", "Rain fell all day. The river rose. Boats left.",
        "One line only", "Snow came late? Nobody minded."]


def test_nsp_pairs_are_true_successors_or_other_documents():
    sentences = [data.split_sentences(d) for d in DOCS]
    assert sentences[0] == ["The cat sat.", "It was happy!", "Then it slept."]
    pairs = [p for seed in range(40) for p in data.nsp_pairs(DOCS, seed=seed)]
    assert len(pairs) == 40 * (2 + 2 + 0 + 1)       # one pair per sentence with a successor
    labels = [p["next_sentence_label"] for p in pairs]
    assert 0.3 < sum(labels) / len(labels) < 0.7     # about half "NotNext"
    doc_of = {s: i for i, d in enumerate(sentences) for s in d}
    for p in pairs:
        a, b = p["text_a"], p["text_b"]
        same_doc = sentences[doc_of[a]]
        if p["next_sentence_label"] == 0:            # IsNext: the very next sentence
            assert same_doc.index(b) == same_doc.index(a) + 1
        else:                                        # NotNext: from another document
            assert doc_of[b] != doc_of[a]
    assert data.nsp_pairs(DOCS, seed=3) == data.nsp_pairs(DOCS, seed=3)   # seeded
    with pytest.raises(ValueError, match="at least two sentences"):
        data.nsp_pairs(["one sentence", "another one"])


def test_nsp_collation_keeps_pair_labels_and_segments(minilm_tokenizer):
    feats = data.tokenize_pairs(data.nsp_pairs(DOCS, seed=0), minilm_tokenizer, max_length=16)
    batch = data.mlm_collator(minilm_tokenizer)(feats)
    assert batch["next_sentence_label"].tolist() == [f["next_sentence_label"] for f in feats]
    assert batch["input_ids"].shape[1] <= 16
    types = batch["token_type_ids"][0][batch["attention_mask"][0].bool()]
    assert types[0] == 0 and types[-1] == 1 and bool((types.diff() >= 0).all())  # A then B


def test_squad_features_point_at_the_answer(minilm_tokenizer):
    examples = data.load_squad("train", DATA / "squad")
    feats = data.squad_features(examples, minilm_tokenizer, max_length=64, stride=16, train=True)
    for f in feats[:3]:
        span = minilm_tokenizer.decode(f["input_ids"][f["start_positions"]:f["end_positions"] + 1])
        ex = next(e for e in examples if e["question"].lower().startswith(
            minilm_tokenizer.decode(f["input_ids"][1:4]).split()[0]))
        assert span == ex["answers"]["text"][0].lower()
    # eval side: logits peaked on the gold span give back the gold text
    dev = data.load_squad("validation", DATA / "squad")
    eval_feats = data.squad_features(dev, minilm_tokenizer, max_length=64, stride=16, train=False)
    gold = data.squad_features(dev, minilm_tokenizer, max_length=64, stride=16, train=True)
    starts, ends = [], []
    for g, f in zip(gold, eval_feats):
        s, e = torch.zeros(len(f["input_ids"])), torch.zeros(len(f["input_ids"]))
        s[g["start_positions"]], e[g["end_positions"]] = 5.0, 5.0
        starts.append(s)
        ends.append(e)
    preds = data.squad_predictions(dev, eval_feats, starts, ends)
    assert preds == {"d1": "1937", "d2": "the strait between San Francisco Bay and the Pacific Ocean"}
    refs = {e["id"]: e["answers"]["text"] for e in dev}
    assert metrics.squad_metrics(preds, refs) == {"exact_match": 100.0, "f1": 100.0}


def test_metrics_by_hand():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # tp=1 fp=1 fn=1 -> F1 = 2/(2+1+1)
    assert metrics.binary_f1([1, 1, 0], [1, 0, 1]) == pytest.approx(0.5)
    assert metrics.glue_metrics("qqp", [1, 1, 0], [1, 0, 1]) == {"accuracy": pytest.approx(1 / 3),
                                                                  "f1": pytest.approx(0.5)}
    assert metrics.normalize_answer("The  Golden, Gate!") == "golden gate"
    # prediction "golden gate bridge" vs truth "the golden gate": 2 common, P=2/3, R=1
    assert metrics.squad_f1("golden gate bridge", "the golden gate") == pytest.approx(0.8)
    got = metrics.squad_metrics({"a": "Paris", "b": "in 1937"}, {"a": ["paris"], "b": ["1937", "1938"]})
    assert got["exact_match"] == 50.0 and got["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="no prediction"):
        metrics.squad_metrics({}, {"a": ["x"]})


def test_retrieval_agreement_by_hand():
    ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert metrics.retrieval_agreement(ref, ref, k=1) == {"top1": 1.0, "top1_overlap": 1.0}
    swapped = ref[:, [1, 0]]  # mirror image: same neighbour structure
    assert metrics.retrieval_agreement(ref, swapped, k=1)["top1"] == 1.0
    scrambled = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    got = metrics.retrieval_agreement(ref, scrambled, k=1)
    assert got["top1"] == 0.0  # every nearest neighbour changed
    assert metrics.mean_cosine(ref, ref) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must be in"):
        metrics.retrieval_agreement(ref, ref, k=4)
