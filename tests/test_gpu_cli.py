"""On a CUDA device: the training CLI trains there (prune -> finetune -> quantize on a tiny BERT) and
writes models that load back. The tokenizer is built from a small vocabulary here, so the test needs
no model package. Skipped without CUDA (scripts/gpu_check.sh runs it on the device)."""
import json
from pathlib import Path

import pytest
import torch

from sparse_ofa.cli import main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DATA = Path(__file__).parent / "data"


def _tiny_teacher(root: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    words = sorted({w.lower().strip(".,!?\"'") for line in (DATA / "glue_sst2" / "train.tsv").read_text().splitlines()
                    for w in line.split()} - {""})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    import inspect

    key = "vocab_file" if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab"
    tokenizer = BertTokenizerFast(**{key: str(root / "vocab.txt")})  # transformers 4 / 5 spelling
    assert tokenizer.vocab_size > 20
    teacher = root / "teacher"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    return teacher


def test_training_commands_run_on_the_gpu(tmp_path):
    teacher = _tiny_teacher(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text((DATA / "glue_sst2" / "train.tsv").read_text().split("\n", 1)[1])
    common = ["--batch-size", "4", "--max-length", "32", "--no-progress"]
    assert main(["prune", str(teacher), str(tmp_path / "pruned"), "--data", str(text), "--steps", "4",
                 "--ramp-steps", "3", "--update-every", "1", "--sparsity", "0.75", *common]) == 0
    assert main(["finetune", str(tmp_path / "pruned"), str(tmp_path / "sst2"), "--task", "sst2",
                 "--data-dir", str(DATA / "glue_sst2"), "--steps", "3", *common]) == 0
    assert main(["quantize", str(tmp_path / "sst2"), str(tmp_path / "sst2q"), "--task", "sst2",
                 "--data-dir", str(DATA / "glue_sst2"), "--steps", "3", *common]) == 0
    for name in ("pruned", "sst2", "sst2q"):
        config = json.loads((tmp_path / name / "run_config.json").read_text())
        assert config["device"].startswith("cuda"), (name, config["device"])
    assert json.loads((tmp_path / "sst2" / "run_config.json").read_text())["masks_identical"] is True
    from sparse_ofa import from_pretrained
    from transformers import AutoModelForSequenceClassification

    model = from_pretrained(tmp_path / "sst2q", model_class=AutoModelForSequenceClassification).cuda()
    ids = torch.randint(5, 20, (2, 12), device="cuda")
    assert model(input_ids=ids).logits.shape == (2, 2)
