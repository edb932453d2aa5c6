"""Checks of a run config's inputs made before any process group starts (``biomedgpt-train``, its ``--dry-run``
and ``slurm/job_prep.py``): every data path, the tokenizer, the answers and negative-sample files and
``model.init_from``. Without them a missing directory surfaces a minute or more later inside mosaicml-streaming
(after the DeepSpeed set-up), without the config key that named it. All problems are collected into one message.

Light on purpose: ``slurm/job_prep.py`` runs it in the batch shell, before ``srun``.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from biomedgpt.train.config import TrainConfig

# URL schemes mosaicml-streaming downloads from: the keys of DOWNLOADER_MAPPINGS in
# streaming/base/storage/download.py (0.13), "dbfs-uc" being its name for dbfs:/Volumes paths.
STREAMING_REMOTE_SCHEMES = ("alipan", "azure", "azure-dl", "dbfs", "gs", "hf", "oci", "s3", "sftp")
PRETRAINING_SOURCES = ("vision_language", "text", "image", "detection")
NEGATIVE_SAMPLE_FILES = ("type2ans.json", "object.txt", "all_captions.txt")
GPT2_BPE_ADVICE = (
    "the original GPT-2 BPE files encoder.json, vocab.bpe and dict.txt (utils/BPE in the BiomedGPT repository; "
    "BiomedGPTTokenizer.from_gpt2_bpe, README 'Tokenizer'), or the tokenizer saved with model.init_from"
)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


@dataclass(frozen=True)
class InputProblem:
    """One unusable input: the config key, its value and what is wrong with what to do about it."""

    key: str
    value: str | None
    problem: str

    def __str__(self) -> str:
        if self.value is None:
            return f"{self.key} is not set: {self.problem}"
        shown = self.value
        if not _scheme(self.value) and not Path(self.value).is_absolute():
            shown += f" (= {Path(self.value).resolve()})"  # relative to where the job runs, which may surprise
        return f"{self.key}={shown}: {self.problem}"


class InputError(ValueError):
    """The config's inputs are not usable; lists every problem found."""

    def __init__(self, problems: list[InputProblem], hint: str = "") -> None:
        self.problems = problems
        count = (
            "1 input of the run config is" if len(problems) == 1 else f"{len(problems)} inputs of the run config are"
        )
        lines = [f"{count} missing or unusable:", *(f"  {p}" for p in problems)]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


def _scheme(value: str) -> str | None:
    match = _URL.match(value)
    return match.group(1).lower() if match else None


def _converted_dir(key: str, value: str, kind: str) -> InputProblem | None:
    """A local converted directory: it must hold the index.json biomedgpt-convert writes."""
    path = Path(value)
    convert = f"convert the TSV with biomedgpt-convert --kind {kind} --out {value} first"
    if not path.exists():
        return InputProblem(key, value, f"does not exist; {convert}")
    if not path.is_dir():
        return InputProblem(key, value, f"is a file, not a converted directory; {convert}")
    if not (path / "index.json").is_file():
        return InputProblem(key, value, f"no index.json there; {convert}")
    return None


def _local_only(key: str, value: str, task: str) -> InputProblem | None:
    scheme = _scheme(value)
    if scheme is None:
        return None
    if task == "pretrain":
        advice = (
            "mosaicml-streaming reads remotes through data.remote_root (a remote folder holding vision_language/, "
            f"text/, image/, detection/), with {key} a local cache folder"
        )
    else:
        advice = "fine-tuning and validation read converted splits from a local (or shared) directory; copy it there"
    return InputProblem(key, value, f"a {scheme}:// URL is not a directory here; {advice}")


def _remote_root(value: str, names: list[str]) -> list[InputProblem]:
    scheme = _scheme(value)
    if scheme is None:  # a local folder as the remote: streaming copies from it
        problems = []
        for name in names:
            if not (Path(value) / name / "index.json").is_file():
                problems.append(
                    InputProblem("data.remote_root", value, f"no {name}/index.json there; convert into {value}/{name}")
                )
        return problems
    if scheme not in STREAMING_REMOTE_SCHEMES:
        supported = ", ".join(f"{s}://" for s in STREAMING_REMOTE_SCHEMES)
        return [InputProblem("data.remote_root", value, f"mosaicml-streaming cannot read {scheme}://; use {supported}")]
    return []  # reachable or not, only streaming (with its credentials) can tell


def _file(key: str, value: str, what: str) -> InputProblem | None:
    path = Path(value)
    if not path.exists():
        return InputProblem(key, value, f"does not exist; give the path of {what}")
    if not path.is_file():
        return InputProblem(key, value, f"is not a file; give the path of {what}")
    return None


def _tokenizer(config: TrainConfig) -> tuple[int | None, list[InputProblem]]:
    """The vocabulary size of ``data.tokenizer`` when it loads, else the problem."""
    from biomedgpt.tokenizer import BiomedGPTTokenizer

    value = config.data.tokenizer
    if not value:
        return len(BiomedGPTTokenizer.default()), []
    if not Path(value).exists():
        return None, [InputProblem("data.tokenizer", value, f"does not exist; put there {GPT2_BPE_ADVICE}")]
    try:
        return len(BiomedGPTTokenizer.from_pretrained(value)), []
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: sentencepiece on a damaged spm.model
        return None, [
            InputProblem("data.tokenizer", value, f"cannot be loaded ({error}); it should hold {GPT2_BPE_ADVICE}")
        ]


def _init_from(value: str, vocab_size: int | None) -> list[InputProblem]:
    path = Path(value)
    advice = "give a model directory (biomedgpt-consolidate or biomedgpt-import output)"
    if not path.is_dir():
        return [
            InputProblem(
                "model.init_from", value, f"{'is not a directory' if path.exists() else 'does not exist'}; {advice}"
            )
        ]
    if not (path / "config.json").is_file():
        return [InputProblem("model.init_from", value, f"no config.json there; {advice}")]
    weights = [*path.glob("*.safetensors"), *path.glob("*.safetensors.index.json"), *path.glob("pytorch_model*.bin")]
    if not weights:
        return [InputProblem("model.init_from", value, f"no weights (*.safetensors) there; {advice}")]
    try:
        model_vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
    except (OSError, json.JSONDecodeError) as error:
        return [InputProblem("model.init_from", value, f"config.json cannot be read ({error})")]
    if vocab_size is not None and model_vocab is not None and int(model_vocab) != vocab_size:
        return [
            InputProblem(
                "model.init_from",
                value,
                f"the model has vocab_size={model_vocab} but data.tokenizer has {vocab_size} ids; set "
                f"data.tokenizer to the tokenizer saved with that model (data.tokenizer={value})",
            )
        ]
    return []


def uses_demo_tokenizer(config: TrainConfig) -> bool:
    """Whether the run would train with the small tokenizer shipped for tests and the demo.

    A copy of it (a model directory the demo saved, with the same ``spm.model``) counts when the model is built from
    scratch, as its size then follows the vocabulary; a model to start from (``model.init_from``) fixes its own.
    """
    from biomedgpt.tokenizer import SPM_MODEL_NAME, default_tokenizer_dir

    value = config.data.tokenizer
    if not value or Path(value).resolve() == default_tokenizer_dir().resolve():
        return True
    if config.model.init_from:
        return False
    copy, bundled = Path(value) / SPM_MODEL_NAME, default_tokenizer_dir() / SPM_MODEL_NAME
    return copy.is_file() and copy.read_bytes() == bundled.read_bytes()


def demo_tokenizer_problem(config: TrainConfig) -> InputProblem | None:
    """The shipped tokenizer outside an explicit opt-in: a model that matches no published checkpoint."""
    if not uses_demo_tokenizer(config) or config.data.allow_demo_tokenizer:
        return None
    return InputProblem(
        "data.tokenizer",
        config.data.tokenizer,
        "the bundled 12,193-id demo tokenizer would be used, which gives models of other sizes than the published "
        f"ones (the 59,457-id vocabulary); set data.tokenizer to {GPT2_BPE_ADVICE}. For an experiment with the "
        "demo tokenizer set data.allow_demo_tokenizer=true",
    )


def _negative_samples(value: str | None) -> InputProblem | None:
    needed = ", ".join(NEGATIVE_SAMPLE_FILES)
    if not value:
        return InputProblem("data.negative_samples", None, f"pretraining needs the folder with {needed}")
    if not Path(value).is_dir():
        return InputProblem(
            "data.negative_samples",
            value,
            f"{'is not a directory' if Path(value).exists() else 'does not exist'}; give the folder with {needed} "
            "(biomedgpt-sample-data writes an example in negative_sample/)",
        )
    missing = [name for name in NEGATIVE_SAMPLE_FILES if not (Path(value) / name).is_file()]
    if missing:
        return InputProblem("data.negative_samples", value, f"{', '.join(missing)} missing there (needs {needed})")
    return None


def _pretraining_data(config: TrainConfig) -> list[InputProblem]:
    data = config.data
    mixture = {"text": data.mixture_text, "image": data.mixture_image, "detection": data.mixture_detection}
    # An auxiliary source with a mixture count of 0 is never opened (biomedgpt.data.pipeline.PretrainStream).
    used = [
        name for name in PRETRAINING_SOURCES if name == "vision_language" or (getattr(data, name) and mixture[name] > 0)
    ]
    problems = []
    for name in used:
        key, value = f"data.{name}", getattr(data, name)
        problem = _local_only(key, value, "pretrain")
        if problem is None and data.remote_root is None:  # with a remote, the local paths are caches streaming fills
            problem = _converted_dir(key, value, name)
        if problem is not None:
            problems.append(problem)
    if data.remote_root is not None:
        problems += _remote_root(data.remote_root, used)
    negatives = _negative_samples(data.negative_samples)
    return problems + ([negatives] if negatives else [])


def _finetuning_data(config: TrainConfig) -> list[InputProblem]:
    data = config.data
    problems = []
    if data.remote_root is not None:
        problems.append(
            InputProblem(
                "data.remote_root",
                data.remote_root,
                "only pretraining streams from a remote; fine-tuning reads data.train from a local directory "
                "(unset data.remote_root)",
            )
        )
    problems.append(
        _local_only("data.train", data.train, data.task) or _converted_dir("data.train", data.train, data.task)
    )
    if data.answers:
        what = "the candidate answers (a JSON list, or {answer: index} like the original ans2label files)"
        problems.append(_file("data.answers", data.answers, what))
    return [problem for problem in problems if problem is not None]


def input_problems(config: TrainConfig) -> list[InputProblem]:
    """Every data path, the tokenizer, answers, negative samples and ``model.init_from`` that cannot be used."""
    problems = _pretraining_data(config) if config.data.task == "pretrain" else _finetuning_data(config)
    section, task = config.validation, config.data.task
    if section.data:
        problem = _local_only("validation.data", section.data, task) or _converted_dir(
            "validation.data", section.data, task
        )
        problems += [problem] if problem else []
    if section.answer_types:
        problem = _file("validation.answer_types", section.answer_types, "a JSON object question_id -> CLOSED/OPEN")
        problems += [problem] if problem else []
    vocab_size, tokenizer_problems = _tokenizer(config)
    problems += tokenizer_problems
    if config.model.init_from:
        problems += _init_from(config.model.init_from, vocab_size)
    return problems


def check_inputs(
    config: TrainConfig, allow_missing: bool = False, hint: str = "", stream: TextIO | None = None
) -> list[InputProblem]:
    """Raise :class:`InputError` naming every unusable input (``hint`` ends the message); with ``allow_missing``
    (planning) report them on ``stream`` and return them instead. The demo-tokenizer refusal is never waived."""
    refused = demo_tokenizer_problem(config)
    if refused is not None:
        raise InputError([refused])
    problems = input_problems(config)
    if problems and not allow_missing:
        raise InputError(problems, hint)
    if problems:
        message = f"warning: {InputError(problems)}\n(planning anyway: --allow-missing-data)"
        print(message, file=stream or sys.stderr, flush=True)
    return problems


def demo_tokenizer_warning(config: TrainConfig) -> str | None:
    """The loud warning of an opted-in demo-tokenizer run outside the demo preset, or None."""
    if not (uses_demo_tokenizer(config) and config.data.allow_demo_tokenizer):
        return None
    return (
        "WARNING: data.allow_demo_tokenizer=true: training with the bundled 12,193-id demo tokenizer, not the "
        "original 59,457-id vocabulary; the model matches no published BiomedGPT checkpoint and cannot load one. "
        f"For real runs set data.tokenizer to {GPT2_BPE_ADVICE}."
    )


def start_checks(config: TrainConfig, *, allow_missing: bool = False, hint: str = "") -> list[str]:
    """The BiomedGPT recipe's start check (see :data:`biomedgpt.train.recipes.RECIPES`): :func:`check_inputs`, and
    the warnings to show (an opted-in demo tokenizer)."""
    check_inputs(config, allow_missing=allow_missing, hint=hint)
    warning = demo_tokenizer_warning(config)
    return [warning] if warning else []
