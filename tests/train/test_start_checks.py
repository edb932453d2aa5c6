"""What ``biomedgpt-train`` and ``slurm/job_prep.py`` check before any process group starts: the config's input
paths (all named in one message), the demo tokenizer outside the demo, the world size; a start without a launcher
runs as one rank; ``--help`` answers without importing torch, transformers or DeepSpeed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from training_jobs import SMALL

from biomedgpt.config_utils import load_config
from biomedgpt.demo import demo_overrides, prepare_demo_data
from biomedgpt.model.config import ORIGINAL_VOCAB_SIZE, PUBLISHED_PARAMETER_COUNTS
from biomedgpt.tokenizer import BiomedGPTTokenizer, default_tokenizer_dir
from biomedgpt.train.cli import LAUNCH_VARIABLES, SINGLE_RANK_NOTE, main, single_rank_environment
from biomedgpt.train.config import TrainConfig, preset_paths
from biomedgpt.train.preflight import STREAMING_REMOTE_SCHEMES, input_problems

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "deepspeed")
# Every variable a launcher (torchrun, deepspeed, srun, mpirun) would set: a plain start has none of them.
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_")
LAUNCHER_NAMES = (*LAUNCH_VARIABLES, "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_RANK", "GROUP_RANK")


def plain_environment(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in LAUNCHER_NAMES and not key.startswith(LAUNCHER_PREFIXES)
    }
    return {**env, "OMP_NUM_THREADS": "1", "BIOMEDGPT_NO_PROGRESS": "1", **extra}


def run_module(args: list[str], cwd: Path, env: dict[str, str] | None = None, script: str | None = None):
    """``python -m biomedgpt.train ARGS`` (or ``python SCRIPT ARGS``) in a fresh interpreter; the heavy modules it
    had imported by its exit are printed as JSON on the last stderr line."""
    target = f"runpy.run_path({script!r}, run_name='__main__')" if script else (
        "runpy.run_module('biomedgpt.train', run_name='__main__', alter_sys=True)"
    )  # fmt: skip
    code = (
        "import atexit, json, runpy, sys\n"
        f"atexit.register(lambda: print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))\n"
        f"sys.argv = ['biomedgpt-train', *{args!r}]\n"
        f"{target}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env or plain_environment(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    imported = json.loads(proc.stderr.strip().splitlines()[-1])
    return proc, imported


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def pretrain_config(root: Path, **data: object) -> dict:
    return {
        "data": {
            "task": "pretrain",
            "vision_language": str(root / "converted" / "vision_language"),
            "text": str(root / "converted" / "text"),
            "image": str(root / "converted" / "image"),
            "detection": str(root / "converted" / "detection"),
            "negative_samples": str(root / "corpus" / "negative_sample"),
            "allow_demo_tokenizer": True,
            **data,
        },
        "tracking": {"enabled": False},
    }


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("start_checks_data")
    prepare_demo_data(root, rows=16, image_size=64)
    return root


def test_every_missing_input_is_named_in_one_message_before_anything_starts(tmp_path):
    (tmp_path / "text").mkdir()  # a directory, but not a converted one
    (tmp_path / "negatives").mkdir()
    (tmp_path / "negatives" / "object.txt").write_text("lung\n")
    config = write_config(
        tmp_path / "run.yaml",
        {
            "data": {
                "vision_language": str(tmp_path / "vl"),
                "text": str(tmp_path / "text"),
                "negative_samples": str(tmp_path / "negatives"),
                "tokenizer": str(tmp_path / "bpe"),
            },
            "model": {"init_from": str(tmp_path / "model")},
        },
    )
    proc, imported = run_module(["--config", str(config)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "5 inputs of the run config are missing or unusable:" in err and "Nothing was started." in err
    assert f"data.vision_language={tmp_path / 'vl'}: does not exist; convert the TSV with biomedgpt-convert" in err
    assert (
        f"data.text={tmp_path / 'text'}: no index.json there; convert the TSV with biomedgpt-convert --kind text" in err
    )
    assert f"data.negative_samples={tmp_path / 'negatives'}: type2ans.json, all_captions.txt missing there" in err
    assert f"data.tokenizer={tmp_path / 'bpe'}: does not exist; put there the original GPT-2 BPE files" in err
    assert f"model.init_from={tmp_path / 'model'}: does not exist" in err
    assert imported == []  # no torch, no process group, no DeepSpeed op build: the failure takes seconds

    # The dry run reports the same and says how to plan anyway.
    proc, _ = run_module(["--config", str(config), "--dry-run"], tmp_path)
    assert proc.returncode == 2 and "data.vision_language=" in proc.stderr
    assert "--dry-run --allow-missing-data plans without them" in proc.stderr


def test_relative_paths_show_where_they_point(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "pretrain_tiny", "--dry-run", "data.detection=elsewhere/detection"]) == 2
    err = capsys.readouterr().err
    assert f"data.vision_language=data/converted/vision_language (= {tmp_path}/data/converted/vision_language)" in err
    assert f"data.detection=elsewhere/detection (= {tmp_path}/elsewhere/detection): does not exist" in err
    assert f"data.tokenizer=data/bpe (= {tmp_path}/data/bpe): does not exist" in err


def test_job_prep_refuses_missing_inputs_before_srun(tmp_path):
    config = write_config(tmp_path / "run.yaml", pretrain_config(tmp_path))
    env = plain_environment(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlruns.db'}")
    proc = subprocess.run(
        [sys.executable, str(REPO / "slurm" / "job_prep.py"), "--mlflow", "--check-inputs", "--config", str(config)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    for key in ("vision_language", "text", "image", "detection", "negative_samples"):
        assert f"data.{key}={tmp_path}" in proc.stderr
    assert "checkpoint_dir=" not in proc.stdout  # launch.sh gets nothing to start from
    assert not (tmp_path / "mlruns.db").exists()  # and no MLflow run was created for a job that cannot run


def test_a_complete_config_passes_and_optional_sources_are_checked_only_when_used(data_root):
    def problems(*overrides: str) -> list[str]:
        config = load_config(TrainConfig, pretrain_config(data_root), list(overrides), presets=preset_paths())
        return [problem.key for problem in input_problems(config)]

    assert problems() == []
    missing = str(data_root / "nowhere")
    assert problems(f"data.text={missing}") == ["data.text"]
    assert problems(f"data.text={missing}", "data.mixture_text=0") == []  # never opened with a count of 0
    assert problems("data.negative_samples=null") == ["data.negative_samples"]


def test_remotes_go_through_remote_root_as_streaming_expects(data_root, tmp_path):
    def messages(*overrides: str) -> list[str]:
        config = load_config(TrainConfig, pretrain_config(tmp_path / "cache"), list(overrides), presets=preset_paths())
        negatives = f"data.negative_samples={data_root / 'corpus' / 'negative_sample'}"
        config = load_config(TrainConfig, config, [negatives])
        return [str(problem) for problem in input_problems(config)]

    # A URL in a data path: streaming would take it for a local folder.
    found = messages("data.vision_language=s3://bucket/converted/vision_language", "data.mixture_text=0",
                     "data.mixture_image=0", "data.mixture_detection=0")  # fmt: skip
    assert len(found) == 1 and "data.vision_language=s3://bucket/converted/vision_language: a s3:// URL" in found[0]
    assert "data.remote_root" in found[0]
    # With data.remote_root the data paths are caches streaming fills: nothing needs to exist locally.
    assert messages("data.remote_root=s3://bucket/converted") == []
    assert "cannot read ftp://" in messages("data.remote_root=ftp://host/converted")[0]
    # A local folder as the remote must hold the converted directories.
    assert messages(f"data.remote_root={data_root / 'converted'}") == []
    local_remote = messages(f"data.remote_root={tmp_path}")
    assert f"data.remote_root={tmp_path}: no vision_language/index.json there" in local_remote[0]
    assert len(local_remote) == 4


def test_streaming_remote_schemes_match_the_installed_streaming():
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS

    assert set(STREAMING_REMOTE_SCHEMES) == set(DOWNLOADER_MAPPINGS) - {"", "dbfs-uc"}


def test_fine_tuning_inputs_and_the_model_to_start_from(data_root, tmp_path):
    import torch

    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration

    corpus, converted = data_root / "corpus", data_root / "converted"
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    tiny = BiomedGPTConfig.for_size("tiny", vocab_size=len(BiomedGPTTokenizer.default()))
    BiomedGPTForConditionalGeneration(tiny).save_pretrained(model_dir)

    def problems(*overrides: str) -> list[str]:
        base = [
            "model.size=tiny", f"model.init_from={model_dir}", "data.tokenizer=null", "data.allow_demo_tokenizer=true",
            f"data.train={converted / 'vqa_train'}", f"data.answers={corpus / 'vqa_ans2label.json'}",
            f"validation.data={converted / 'vqa_val'}", f"validation.answer_types={corpus / 'vqa_answer_types.json'}",
        ]  # fmt: skip
        config = load_config(TrainConfig, "finetune_vqa", [*base, *overrides], presets=preset_paths())
        return [str(problem) for problem in input_problems(config)]

    assert problems() == []
    found = problems(f"data.train={tmp_path / 'train'}", f"data.answers={tmp_path / 'ans.json'}",
                     f"validation.data={tmp_path}", f"validation.answer_types={tmp_path / 'types.json'}",
                     "data.remote_root=s3://bucket")  # fmt: skip
    assert [line.split("=")[0] for line in found] == [
        "data.remote_root", "data.train", "data.answers", "validation.data", "validation.answer_types"
    ]  # fmt: skip
    assert "convert the TSV with biomedgpt-convert --kind vqa" in found[1]

    # A tokenizer that does not fit the model is found now, not after the DeepSpeed set-up.
    other = tmp_path / "other_tokenizer"
    BiomedGPTTokenizer.default().save_pretrained(other)
    BiomedGPTConfig.for_size("tiny", vocab_size=ORIGINAL_VOCAB_SIZE).save_pretrained(model_dir)  # config.json only
    mismatch = problems(f"data.tokenizer={other}")
    assert len(mismatch) == 1 and f"vocab_size={ORIGINAL_VOCAB_SIZE} but data.tokenizer has" in mismatch[0]
    for weights in model_dir.glob("*.safetensors*"):
        weights.unlink()
    assert "no weights (*.safetensors) there" in problems()[0]


def test_dry_run_can_plan_without_the_data_and_then_assumes_the_original_vocabulary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "pretrain_xlarge", "--dry-run", "--world-size", "8", "--allow-missing-data"]) == 0
    captured = capsys.readouterr()
    assert "warning: 6 inputs of the run config are missing or unusable:" in captured.err
    assert "data.vision_language=data/converted/vision_language" in captured.err
    assert f"({PUBLISHED_PARAMETER_COUNTS['xlarge']:,} trainable), vocabulary {ORIGINAL_VOCAB_SIZE:,}" in captured.out
    with pytest.raises(SystemExit) as stopped:
        main(["--config", "pretrain_xlarge", "--allow-missing-data"])  # a training run needs its inputs
    assert stopped.value.code == 2
    assert "--allow-missing-data only goes with --dry-run" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["pretrain_tiny", "pretrain_xlarge", "finetune_nli"])
def test_the_demo_tokenizer_is_refused_outside_the_demo_unless_opted_in(preset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for tokenizer in ("data.tokenizer=null", f"data.tokenizer={default_tokenizer_dir()}"):
        assert main(["--config", preset, "--dry-run", "--allow-missing-data", tokenizer, "model.init_from=null"]) == 2
        err = capsys.readouterr().err
        assert "data.tokenizer" in err and "the bundled 12,193-id demo tokenizer would be used" in err
        assert "encoder.json, vocab.bpe and dict.txt (utils/BPE in the BiomedGPT repository" in err
        assert "data.allow_demo_tokenizer=true" in err
    opted_in = ["data.tokenizer=null", "data.allow_demo_tokenizer=true", "model.init_from=null"]
    assert main(["--config", preset, "--dry-run", "--allow-missing-data", *opted_in]) == 0
    captured = capsys.readouterr()
    assert "WARNING: data.allow_demo_tokenizer=true: training with the bundled 12,193-id demo tokenizer" in captured.err
    assert f"vocabulary {len(BiomedGPTTokenizer.default()):,}" in captured.out


def test_a_copy_of_the_demo_tokenizer_is_the_demo_tokenizer_for_a_model_built_from_scratch(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "demo_out" / "model"  # where the demo's consolidated model keeps its tokenizer
    BiomedGPTTokenizer.default().save_pretrained(copy)
    args = ["--config", "pretrain_xlarge", "--dry-run", "--allow-missing-data", f"data.tokenizer={copy}"]
    assert main(args) == 2
    assert "the bundled 12,193-id demo tokenizer would be used" in capsys.readouterr().err
    # Another SentencePiece model is not the demo's (this one does not even load, which is another error).
    other = tmp_path / "other"
    shutil.copytree(copy, other)
    (other / "spm.model").write_bytes((copy / "spm.model").read_bytes() + b"\0")
    main([*args[:-1], f"data.tokenizer={other}"])
    assert "the bundled 12,193-id demo tokenizer would be used" not in capsys.readouterr().err


def test_the_demo_preset_uses_the_demo_tokenizer_without_a_warning(data_root, monkeypatch, capsys):
    overrides = [
        f"data.{kind}={data_root / 'converted' / kind}" for kind in ("vision_language", "text", "image", "detection")
    ]
    overrides.append(f"data.negative_samples={data_root / 'corpus' / 'negative_sample'}")
    assert main(["--config", "demo", "--dry-run", *overrides]) == 0
    captured = capsys.readouterr()
    assert "WARNING" not in captured.err and "vocabulary 12,193" in captured.out


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_world_size_must_be_a_positive_integer(value, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--config", "demo", "--dry-run", "--allow-missing-data", "--world-size", value])
    assert stopped.value.code == 2
    assert "argument --world-size" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", value)
    assert main(["--config", "demo", "--dry-run", "--allow-missing-data"]) == 2
    assert f"environment variable WORLD_SIZE={value!r}" in capsys.readouterr().err


def test_help_answers_without_importing_torch_transformers_or_deepspeed(tmp_path):
    proc, imported = run_module(["--help"], tmp_path)
    assert proc.returncode == 0 and "--allow-missing-data" in proc.stdout
    assert imported == []


def test_the_config_names_the_model_sizes_of_the_model():
    from typing import get_args

    from biomedgpt.model.config import MODEL_SIZES
    from biomedgpt.train.config import ModelSize

    assert list(get_args(ModelSize)) == list(MODEL_SIZES)


def test_launchers_are_recognised_and_a_plain_start_becomes_one_rank():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "29400"}
    assert not single_rank_environment(environ := dict(torchrun)) and environ == torchrun
    srun = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0",
            "SLURM_TASKS_PER_NODE": "2"}  # fmt: skip
    assert not single_rank_environment(environ := dict(srun)) and environ == srun
    mpi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}  # fmt: skip
    assert not single_rank_environment(environ := dict(mpi)) and environ == mpi

    plain = {"HOME": "/root", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "batch"}  # sbatch shell
    assert single_rank_environment(plain)
    assert {key: plain[key] for key in LAUNCH_VARIABLES} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"
    }  # fmt: skip
    assert plain["MASTER_ADDR"] == "127.0.0.1" and 0 < int(plain["MASTER_PORT"]) < 65536
    kept = {"MASTER_PORT": "31000"}
    assert single_rank_environment(kept) and kept["MASTER_PORT"] == "31000"
    with pytest.raises(ValueError, match="sets LOCAL_RANK but not both RANK and WORLD_SIZE"):
        single_rank_environment({"LOCAL_RANK": "0"})


@pytest.mark.slow
def test_a_plain_start_without_a_launcher_trains_as_one_rank(data_root, tmp_path):
    overrides = [*demo_overrides(data_root, 2), f"checkpoint.dir={tmp_path / 'ckpt'}", *SMALL]
    env = plain_environment(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlruns.db'}")
    proc = subprocess.run(
        [sys.executable, "-m", "biomedgpt.train", "--config", "demo", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stderr.count(SINGLE_RANK_NOTE) == 1
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000002"
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2]
