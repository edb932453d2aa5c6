"""How validation during fine-tuning divides its rows between ranks (the runs themselves: test_finetune_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from biomedgpt.config_utils import load_config
from biomedgpt.data.convert import convert
from biomedgpt.data.sample_corpus import write_sample_corpus
from biomedgpt.evaluation.runner import TaskEvaluator, iter_rows
from biomedgpt.tokenizer import BiomedGPTTokenizer
from biomedgpt.train.config import TrainConfig, preset_paths
from biomedgpt.train.validation import Validator, finetune_task_config

WORLD = 3  # does not divide the 8 validation rows: the shares differ in size


@pytest.fixture(scope="module")
def vqa_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("validation")
    write_sample_corpus(root / "corpus", rows=32, seed=0, image_size=32)  # 8 vqa_val rows
    out = root / "vqa_val"
    summary = convert(str(root / "corpus" / "vqa_val.tsv"), "vqa", str(out), overwrite=True)
    assert summary.rows_rejected == 0
    return out


def _config(data: Path, checkpoint_dir: Path) -> TrainConfig:
    # No data.answers: the default candidates come from the validation rows themselves.
    overrides = [
        f"validation.data={data}",
        f"checkpoint.dir={checkpoint_dir}",
        "data.patch_image_size=32",
        "data.answers=null",
    ]
    return load_config(TrainConfig, "finetune_vqa", overrides, presets=preset_paths())


def test_each_rank_holds_only_its_share_and_all_ranks_the_same_candidates(vqa_val: Path, tmp_path: Path) -> None:
    config = _config(vqa_val, tmp_path)
    tokenizer = BiomedGPTTokenizer.default()
    rows = list(iter_rows(vqa_val))
    validators = [Validator(config, tokenizer, rank, WORLD, torch.device("cpu")) for rank in range(WORLD)]

    numbers = [validator.row_numbers for validator in validators]
    assert len(rows) == 8
    assert sorted(n for share in numbers for n in share) == list(range(len(rows)))
    assert [len(share) for share in numbers] == [3, 3, 2]
    for validator in validators:
        assert validator.row_count == len(rows)
        assert [row["question_id"] for row in validator.rows] == [rows[n]["question_id"] for n in validator.row_numbers]
        assert all(isinstance(row["image"], bytes) for row in validator.rows)

    everything = TaskEvaluator(tokenizer, finetune_task_config(config), rows)
    assert len(everything.candidates) > 1
    for validator in validators:
        assert validator.evaluator.candidates == everything.candidates


def test_no_rows_is_an_error_naming_the_data(vqa_val: Path, tmp_path: Path) -> None:
    config = _config(vqa_val, tmp_path)
    config.validation.limit = 0
    with pytest.raises(ValueError, match=rf"validation.data={vqa_val}: no rows to validate on"):
        Validator(config, BiomedGPTTokenizer.default(), 0, 1, torch.device("cpu"))
