"""Tests for biomedgpt.config_utils: strict typed loading of nested dataclass configs."""

# String annotations on purpose: the loader must resolve them like the trainer's own config modules would.
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from biomedgpt.config_utils import (
    ConfigError,
    config_to_dict,
    describe_config,
    dump_config_yaml,
    flatten_dict,
    load_config,
    load_raw_config,
)


class Precision(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class SchedulerConfig:
    warmup_steps: int = 0
    min_lr: Optional[float] = None  # noqa: UP045 - the typing.Optional spelling must work too


@dataclass
class DataConfig:
    path: Path = Path("data/train")
    tasks: list[str] = field(default_factory=lambda: ["caption"])
    weights: dict[str, float] = field(default_factory=dict)
    shuffle: bool = True


@dataclass
class TrainConfig:
    run_name: str = "demo"
    max_steps: int = 100
    micro_batch_size: int = 8
    global_batch_size: int = 8
    precision: Precision = Precision.BF16
    seed: int | None = None
    eval_every: tuple[int, ...] = (50,)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"help": "AdamW settings"})
    scheduler: SchedulerConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")


@dataclass
class Required:
    name: str
    inner: Inner


@dataclass
class Inner:
    size: int
    scale: float = 1.0


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(data))
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Error messages show cwd-relative file names; run from tmp_path so they are predictable.
    monkeypatch.chdir(tmp_path)
    return tmp_path


def errors_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return excinfo.value.errors


# ---------------------------------------------------------------------------------------------------------------------
# Defaults, nesting, sources
# ---------------------------------------------------------------------------------------------------------------------


def test_defaults_and_partial_nested_dict() -> None:
    assert load_config(TrainConfig) == TrainConfig()
    source = {"optimizer": {"lr": 3e-4}, "data": {"tasks": ["vqa", "caption"]}}
    cfg = load_config(TrainConfig, source, ["optimizer.lr=1e-3"])
    assert source["optimizer"] == {"lr": 3e-4}  # the caller's dict is not modified by overrides
    # Only the given nested keys change; siblings keep their dataclass defaults.
    assert cfg.optimizer == OptimizerConfig(lr=1e-3)
    assert cfg.data.tasks == ["vqa", "caption"]
    assert cfg.data.path == Path("data/train")
    assert cfg.scheduler is None


def test_base_inheritance_and_override_precedence(in_tmp: Path) -> None:
    write(in_tmp / "configs/common/base.yaml", {"run_name": "base", "max_steps": 10, "optimizer": {"lr": 1e-3}})
    write(
        in_tmp / "configs/exp/child.yaml",
        {
            "base": "../common/base.yaml",  # relative to the child's folder, not to cwd
            "max_steps": 20,
            "optimizer": {"weight_decay": 0.0},
            "data": {"tasks": ["vqa"]},
        },
    )
    cfg = load_config(TrainConfig, "configs/exp/child.yaml", ["max_steps=30", "data.tasks=[a, b]"])
    assert cfg.run_name == "base"  # only in base
    assert cfg.optimizer.lr == 1e-3  # base value survives the child's partial "optimizer" mapping (deep merge)
    assert cfg.optimizer.weight_decay == 0.0  # child
    assert cfg.max_steps == 30  # command line beats child beats base
    assert cfg.data.tasks == ["a", "b"]  # lists are replaced, not concatenated


def test_base_by_preset_name_and_list_order(in_tmp: Path) -> None:
    presets = {
        "tiny": write(in_tmp / "presets/tiny.yaml", {"max_steps": 1, "run_name": "tiny"}),
        "bf": write(in_tmp / "presets/bf.json", {"run_name": "bf", "seed": 7}),
    }
    write(in_tmp / "exp.yaml", {"base": ["tiny", "bf"], "seed": 8})
    cfg = load_config(TrainConfig, "exp.yaml", presets=presets)
    assert (cfg.max_steps, cfg.run_name, cfg.seed) == (1, "bf", 8)  # later base wins, the file wins over both
    assert load_config(TrainConfig, "tiny", presets=presets).run_name == "tiny"  # a preset as the source itself

    with pytest.raises(ConfigError, match=r"unknown config preset 'tinny'.*did you mean 'tiny'\?"):
        load_config(TrainConfig, "tinny", presets=presets)


def test_base_cycle_is_detected(in_tmp: Path) -> None:
    write(in_tmp / "a.yaml", {"base": "b.yaml", "max_steps": 1})
    write(in_tmp / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match=r"cycle.*a\.yaml -> b\.yaml -> a\.yaml"):
        load_config(TrainConfig, "a.yaml")


def test_file_problems(in_tmp: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: missing.yaml"):
        load_config(TrainConfig, "missing.yaml")
    write(in_tmp / "dup.yaml", "max_steps: 1\nmax_steps: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'max_steps'"):  # PyYAML alone would keep 2 silently
        load_config(TrainConfig, "dup.yaml")
    write(in_tmp / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        load_config(TrainConfig, "list.yaml")
    write(in_tmp / "empty.yaml", "")
    assert load_config(TrainConfig, "empty.yaml") == TrainConfig()


# ---------------------------------------------------------------------------------------------------------------------
# Unknown keys
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_key_in_file_names_key_file_and_suggestion(in_tmp: Path) -> None:
    write(in_tmp / "configs/demo.yaml", {"optimizer": {"lr_rate": 1e-3}})
    with pytest.raises(ConfigError) as excinfo:
        load_config(TrainConfig, "configs/demo.yaml")
    assert str(excinfo.value) == (
        "unknown key 'optimizer.lr_rate' (from configs/demo.yaml); did you mean 'optimizer.lr'?"
    )


def test_unknown_key_in_inherited_file_names_that_file(in_tmp: Path) -> None:
    write(in_tmp / "base.yaml", {"data": {"shufle": False}})
    write(in_tmp / "child.yaml", {"base": "base.yaml", "max_steps": 5})
    with pytest.raises(
        ConfigError, match=r"unknown key 'data\.shufle' \(from base\.yaml\); did you mean 'data\.shuffle'"
    ):
        load_config(TrainConfig, "child.yaml")


def test_unknown_keys_from_command_line_all_reported() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(TrainConfig, None, ["optimzer.lr=1", "lr=2", "scheduler.warmup=5", "data.zzz=1"])
    errors = errors_of(excinfo)
    assert errors[0] == "unknown key 'optimzer' (from command line); did you mean 'optimizer'?"
    # A key in the wrong section is found by its leaf name.
    assert errors[1] == "unknown key 'lr' (from command line); did you mean 'optimizer.lr'?"
    # Nested inside an Optional dataclass that was null by default.
    assert errors[2] == "unknown key 'scheduler.warmup' (from command line); did you mean 'scheduler.warmup_steps'?"
    # Nothing close: list the keys that are valid there.
    assert errors[3].startswith("unknown key 'data.zzz' (from command line); valid keys here: path, tasks,")
    assert len(errors) == 4


def test_free_form_dict_field_accepts_any_key() -> None:
    cfg = load_config(TrainConfig, {"extra": {"anything": [1, 2]}}, ["extra.note=hi", "data.weights.vqa=0.5"])
    assert cfg.extra == {"anything": [1, 2], "note": "hi"}
    assert cfg.data.weights == {"vqa": 0.5}


# ---------------------------------------------------------------------------------------------------------------------
# Types and coercion
# ---------------------------------------------------------------------------------------------------------------------


def test_type_error_from_file_names_key_expected_value_and_source(in_tmp: Path) -> None:
    write(in_tmp / "bad.yaml", {"max_steps": "lots", "data": {"tasks": ["vqa", 3]}})
    with pytest.raises(ConfigError) as excinfo:
        load_config(TrainConfig, "bad.yaml")
    assert errors_of(excinfo) == [
        "invalid value for 'max_steps': expected int, got 'lots' (from bad.yaml)",
        "invalid value for 'data.tasks[1]': expected str, got 3 (from bad.yaml); quote it in YAML if a string is meant",
    ]


def test_type_error_from_command_line() -> None:
    with pytest.raises(ConfigError, match=r"'optimizer\.lr': expected float, got 'fast' \(from command line\)"):
        load_config(TrainConfig, None, ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match=r"'max_steps': expected int, got '1\.5'"):
        load_config(TrainConfig, None, ["max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"'max_steps': expected int, got True"):  # bool is not an int here
        load_config(TrainConfig, {"max_steps": True})


def test_numbers_yaml_reads_oddly() -> None:
    # PyYAML reads 1e-4 / 1e6 (no dot) as strings; numeric fields still accept them, from files and the CLI.
    cfg = load_config(TrainConfig, yaml.safe_load("optimizer: {lr: 1e-4}\nmax_steps: 1e6\n"), ["seed=3"])
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.max_steps == 1_000_000 and isinstance(cfg.max_steps, int)
    assert load_config(TrainConfig, None, ["optimizer.lr=2e-5", "optimizer.weight_decay=0"]).optimizer == (
        OptimizerConfig(lr=2e-5, weight_decay=0.0)
    )


def test_str_field_keeps_command_line_text() -> None:
    # "no" is False and "1.10" is 1.1 to YAML, but the field is a str, so the user's text is kept.
    assert load_config(TrainConfig, None, ["run_name=no"]).run_name == "no"
    assert load_config(TrainConfig, None, ["run_name=1.10"]).run_name == "1.10"
    assert load_config(TrainConfig, None, ["run_name=null"]).run_name == "null"
    assert load_config(TrainConfig, None, ["data.tasks=[no, yes, 3]"]).data.tasks == ["no", "yes", "3"]
    assert load_config(TrainConfig, None, ["run_name='a b'"]).run_name == "a b"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("false", False), ("yes", True), ("no", False), ("1", True), ("0", False), ("False", False)],
)
def test_bool_from_command_line_strings(text: str, expected: bool) -> None:
    assert load_config(TrainConfig, None, [f"data.shuffle={text}"]).data.shuffle is expected


def test_bool_rejects_other_values() -> None:
    with pytest.raises(ConfigError, match=r"'data\.shuffle': expected bool, got 'maybe' .*use true/false"):
        load_config(TrainConfig, None, ["data.shuffle=maybe"])
    with pytest.raises(ConfigError, match=r"'data\.shuffle': expected bool, got 1 \(from <dict>\)"):
        load_config(TrainConfig, {"data": {"shuffle": 1}})  # an int in a file is a mistake, not a bool


def test_literal_enum_and_errors_list_allowed_values() -> None:
    assert load_config(TrainConfig, None, ["optimizer.name=sgd"]).optimizer.name == "sgd"
    assert load_config(TrainConfig, {"precision": "fp32"}).precision is Precision.FP32  # by value
    assert load_config(TrainConfig, None, ["precision=BF16"]).precision is Precision.BF16  # by member name
    with pytest.raises(ConfigError, match=r"'optimizer\.name': expected one of 'adamw', 'sgd', got 'adam'"):
        load_config(TrainConfig, None, ["optimizer.name=adam"])
    with pytest.raises(ConfigError, match=r"'precision': expected one of 'fp32', 'bf16', got 'fp16'"):
        load_config(TrainConfig, {"precision": "fp16"})


def test_optional_values() -> None:
    assert load_config(TrainConfig, None, ["seed=5"]).seed == 5
    assert load_config(TrainConfig, {"seed": 5}, ["seed=null"]).seed is None
    assert load_config(TrainConfig, {"seed": 5}, ["seed="]).seed is None  # empty value clears an Optional
    with pytest.raises(ConfigError, match=r"'seed': expected int \| None, got 'abc'"):
        load_config(TrainConfig, None, ["seed=abc"])
    cfg = load_config(TrainConfig, None, ["scheduler.min_lr=1e-6"])  # fills a section that defaults to None
    assert cfg.scheduler == SchedulerConfig(min_lr=1e-6)
    assert load_config(TrainConfig, {"scheduler": {"warmup_steps": 3}}, ["scheduler=null"]).scheduler is None


@dataclass
class Mixed:
    ids: Optional[list[int]] = None  # noqa: UP045
    key: int | str = 0
    anything: list = field(default_factory=list)  # bare container: items kept as read


def test_unions_and_bare_containers() -> None:
    assert load_config(Mixed, None, ["key=12"]).key == 12  # first union member that accepts the value wins
    assert load_config(Mixed, None, ["key=abc"]).key == "abc"
    assert load_config(Mixed, {"anything": [1, "a", None]}).anything == [1, "a", None]
    # A bad item inside an Optional list is reported at the item, not as "expected list | None".
    with pytest.raises(ConfigError, match=r"^invalid value for 'ids\[1\]': expected int, got 'b'"):
        load_config(Mixed, None, ["ids=[1, b]"])
    with pytest.raises(ConfigError, match=r"'key': expected int \| str, got \[1\]"):
        load_config(Mixed, None, ["key=[1]"])


def test_list_tuple_path_and_dict_coercion() -> None:
    cfg = load_config(
        TrainConfig,
        {"eval_every": [10, 20], "optimizer": {"betas": [0.9, 0.95]}},
        ["data.path=/scratch/shards", "data.weights={vqa: 1, caption: 0.5}"],
    )
    assert cfg.eval_every == (10, 20)
    assert cfg.optimizer.betas == (0.9, 0.95) and isinstance(cfg.optimizer.betas, tuple)
    assert cfg.data.path == Path("/scratch/shards")
    assert cfg.data.weights == {"vqa": 1.0, "caption": 0.5}
    with pytest.raises(ConfigError, match=r"'optimizer\.betas': expected tuple\[float, float\].*exactly 2 items"):
        load_config(TrainConfig, None, ["optimizer.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"'eval_every\[1\]': expected int, got 'x'"):
        load_config(TrainConfig, None, ["eval_every=[1, x]"])
    with pytest.raises(ConfigError, match=r"'data\.tasks': expected list\[str\], got 'vqa'"):
        load_config(TrainConfig, {"data": {"tasks": "vqa"}})


# ---------------------------------------------------------------------------------------------------------------------
# Dataclass-level checks
# ---------------------------------------------------------------------------------------------------------------------


def test_post_init_error_is_wrapped_with_its_path() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(TrainConfig, None, ["optimizer.lr=-1"])
    assert str(excinfo.value) == "optimizer: lr must be positive, got -1.0"
    assert isinstance(excinfo.value.__cause__, ValueError)
    # The root dataclass has no path; its class name stands in.
    with pytest.raises(ConfigError, match=r"^TrainConfig: global_batch_size must be a multiple of micro_batch_size$"):
        load_config(TrainConfig, {"micro_batch_size": 3, "global_batch_size": 8})


def test_post_init_not_run_on_invalid_fields() -> None:
    # The bad lr type is the one error; __post_init__ never sees a half-converted object.
    with pytest.raises(ConfigError) as excinfo:
        load_config(TrainConfig, None, ["optimizer.lr=abc", "micro_batch_size=3"])
    assert len(errors_of(excinfo)) == 1
    assert "optimizer.lr" in errors_of(excinfo)[0]


def test_missing_required_fields() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(Required, {"inner": {"scale": 2}})
    assert errors_of(excinfo) == [
        "missing required key 'inner.size' (no default): set it in the config file or with inner.size=...",
        "missing required key 'name' (no default): set it in the config file or with name=...",
    ]
    assert load_config(Required, None, ["name=x", "inner.size=4"]) == Required("x", Inner(4))


# ---------------------------------------------------------------------------------------------------------------------
# Where the loader's rules differ from a plain library call (pydantic converts the values; these pin what the
# preparation before it and the messages after it add)
# ---------------------------------------------------------------------------------------------------------------------


def test_scalars_from_a_yaml_file(in_tmp: Path) -> None:
    write(
        in_tmp / "scalars.yaml",
        "optimizer: {lr: 1e-4, weight_decay: 1}\nmax_steps: 2e3\n"
        'data: {shuffle: "yes", path: shards/a, weights: {1: 2}}\n',
    )
    cfg = load_config(TrainConfig, "scalars.yaml")
    assert cfg.optimizer.lr == pytest.approx(1e-4) and type(cfg.optimizer.lr) is float  # YAML read the str "1e-4"
    assert cfg.optimizer.weight_decay == 1.0 and type(cfg.optimizer.weight_decay) is float  # an int for a float
    assert cfg.max_steps == 2000 and type(cfg.max_steps) is int
    assert cfg.data.shuffle is True  # the quoted word "yes"
    assert cfg.data.path == Path("shards/a")  # a str for a Path field
    assert cfg.data.weights == {"1": 2.0}  # YAML's int key 1 for a dict[str, float]
    write(in_tmp / "int_bool.yaml", "data: {shuffle: 1}\n")
    with pytest.raises(ConfigError, match=r"^invalid value for 'data\.shuffle': expected bool, got 1 \(from int_bool"):
        load_config(TrainConfig, "int_bool.yaml")


@dataclass
class Pair:
    pair: tuple[int, str] = (0, "")


def test_fixed_tuples_from_yaml_lists_use_each_position_type(in_tmp: Path) -> None:
    assert load_config(Pair, write(in_tmp / "pair.yaml", "pair: [1, a]\n")).pair == (1, "a")
    with pytest.raises(ConfigError, match=r"^invalid value for 'pair\[1\]': expected str, got 2 \(from pair2\.yaml\)"):
        load_config(Pair, write(in_tmp / "pair2.yaml", "pair: [1, 2]\n"))


def test_several_bad_values_in_one_section_are_all_reported() -> None:
    # Every bad field is named, in the order given, and their section's __post_init__ never runs.
    with pytest.raises(ConfigError) as excinfo:
        load_config(TrainConfig, None, ["max_steps=x", "micro_batch_size=y", "optimizer.lr=z", "optimizer.lr_rate=1"])
    assert errors_of(excinfo) == [
        "invalid value for 'max_steps': expected int, got 'x' (from command line)",
        "invalid value for 'micro_batch_size': expected int, got 'y' (from command line)",
        "invalid value for 'optimizer.lr': expected float, got 'z' (from command line)",
        "unknown key 'optimizer.lr_rate' (from command line); did you mean 'optimizer.lr'?",
    ]


@dataclass
class Stage:
    steps: int = 1
    label: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be at least 1")
        self.label = f"{self.steps} steps"


@dataclass
class Plan:
    note: str | None  # no default: required although it may be null
    stages: list[Stage] = field(default_factory=list)
    first: Stage = field(default_factory=Stage)


def test_dataclass_rules_for_init_false_required_and_lists() -> None:
    plan = load_config(Plan, {"note": None, "stages": [{"steps": 2}, {}], "first": {"steps": 3}})
    # init=False fields keep what __post_init__ computed.
    assert [s.label for s in plan.stages] == ["2 steps", "1 steps"] and plan.first.label == "3 steps"
    with pytest.raises(ConfigError, match=r"^missing required key 'note' \(no default\)"):  # not None
        load_config(Plan, {})
    # init=False fields are not config keys.
    with pytest.raises(ConfigError, match=r"^unknown key 'first\.label' \(from <dict>\)"):
        load_config(Plan, {"note": "x", "first": {"label": "mine"}})
    # Dataclasses inside a list get the same treatment as sections, named by their index; every bad item is named.
    with pytest.raises(ConfigError) as excinfo:
        load_config(Plan, None, ["note=x", "stages=[{steps: 2}, {step: 3}, {steps: x}]"])
    assert errors_of(excinfo) == [
        "unknown key 'stages[1].step' (from command line); did you mean 'stages[1].steps'?",
        "invalid value for 'stages[2].steps': expected int, got 'x' (from command line)",
    ]
    with pytest.raises(ConfigError, match=r"^invalid value for 'stages\[1\]\.steps': expected int, got 'x' \(from c"):
        load_config(Plan, None, ["note=x", "stages=[{steps: 2}, {steps: x}]"])
    with pytest.raises(ConfigError, match=r"^stages\[0\]: steps=0 must be at least 1$") as excinfo:
        load_config(Plan, {"note": "x", "stages": [{"steps": 0}]})
    assert isinstance(excinfo.value.__cause__, ValueError)


# ---------------------------------------------------------------------------------------------------------------------
# Overrides syntax
# ---------------------------------------------------------------------------------------------------------------------


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="must look like dotted.key=value"):
        load_config(TrainConfig, None, ["max_steps"])
    with pytest.raises(ConfigError, match=r"'key\+=value' is not supported"):
        load_config(TrainConfig, None, ["data.tasks+=[vqa]"])
    with pytest.raises(ConfigError, match="'base' can only be set inside a config file"):
        load_config(TrainConfig, None, ["base=other.yaml"])
    # Only the first '=' splits; the value may contain more.
    assert load_config(TrainConfig, None, ["run_name=a=b"]).run_name == "a=b"


def test_raw_config_tracks_origins(in_tmp: Path) -> None:
    write(in_tmp / "base.yaml", {"optimizer": {"lr": 1.0, "name": "sgd"}})
    write(in_tmp / "child.yaml", {"base": "base.yaml", "optimizer": {"lr": 2.0}})
    tree, origins = load_raw_config("child.yaml", ["optimizer.name=adamw", "optimizer.betas=[1, no]"])
    assert tree["optimizer"] == {"lr": 2.0, "name": "adamw", "betas": [1, False]}  # plain YAML readings
    assert origins["optimizer.lr"] == "child.yaml"
    assert origins["optimizer.name"] == "command line"


# ---------------------------------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_round_trip_dict_and_yaml(in_tmp: Path) -> None:
    cfg = load_config(
        TrainConfig,
        None,
        [
            "run_name=no",
            "precision=fp32",
            "seed=1",
            "eval_every=[5, 10]",
            "scheduler.min_lr=1e-6",
            "data.path=/x/y",
            "data.weights={a: 2}",
            "extra={k: [1, {z: null}]}",
        ],
    )
    as_dict = config_to_dict(cfg)
    assert as_dict["precision"] == "fp32" and as_dict["data"]["path"] == "/x/y" and as_dict["eval_every"] == [5, 10]
    assert load_config(TrainConfig, as_dict) == cfg
    assert load_config(TrainConfig, dump_config_yaml(cfg, in_tmp / "out/resolved.yaml")) == cfg
    assert load_config(TrainConfig, json.loads(json.dumps(as_dict))) == cfg  # JSON-safe too (MLflow artifacts)


def test_flatten_dict() -> None:
    flat = flatten_dict(config_to_dict(TrainConfig()))
    assert flat["optimizer.lr"] == 1e-4
    assert flat["data.tasks"] == ["caption"]  # lists stay values
    assert flat["extra"] == {}  # empty mappings are kept so no key disappears
    assert flat["scheduler"] is None
    assert not any(isinstance(v, dict) and v for v in flat.values())
    assert flatten_dict({"a": {"b": {"c": 1}}}, sep="/") == {"a/b/c": 1}
    assert flatten_dict(TrainConfig()) == flat  # dataclasses are accepted directly


def test_describe_config_lists_every_key() -> None:
    text = describe_config(TrainConfig)
    lines = text.splitlines()
    assert "optimizer.lr: float = 0.0001" in lines
    assert "optimizer: OptimizerConfig  # AdamW settings" in lines
    assert "optimizer.name: Literal['adamw', 'sgd'] = 'adamw'" in lines
    assert "scheduler: SchedulerConfig | None = None" in lines
    assert "scheduler.min_lr: float | None = None" in lines
    assert "precision: Precision = 'bf16'" in lines
    assert "data.tasks: list[str] = ['caption']" in lines
    assert "name: str  (required)" in describe_config(Required).splitlines()


@dataclass
class Left:
    x: int = 1


@dataclass
class Right:
    y: str = "b"


@dataclass
class Unions:
    side: Left | Right = field(default_factory=Left)
    number: int | float = 1
    text_first: str | int = "x"
    pair: tuple[float, float] | None = None
    by_id: dict[int, int] = field(default_factory=dict)
    level: Literal[1, 2] = 1


def test_unions_take_the_first_member_that_accepts_the_value_whole() -> None:
    # A mapping goes to the first dataclass member that has all its keys; one that none has is refused, not trimmed.
    assert load_config(Unions, None, ["side.y=no"]).side == Right("no")
    assert load_config(Unions, {"side": {"x": 3}}).side == Left(3)
    with pytest.raises(ConfigError, match=r"^invalid value for 'side': expected Left \| Right, got \{'x': 1, 'z': 2\}"):
        load_config(Unions, {"side": {"x": 1, "z": 2}})
    assert load_config(Unions, None, ["text_first=5"]).text_first == "5"  # str comes first: the text is kept
    with pytest.raises(ConfigError, match=r"'number': expected int \| float, got True"):  # bool is not a number
        load_config(Unions, {"number": True})
    with pytest.raises(ConfigError, match=r"'level': expected one of 1, 2, got True"):
        load_config(Unions, {"level": True})


def test_optional_fixed_tuples_and_mapping_keys_are_named_as_given() -> None:
    with pytest.raises(ConfigError, match=r"^invalid value for 'pair': expected tuple\[float, float\] \| None, got "
                       r"\[1\] \(from <dict>\); needs exactly 2 items$"):  # fmt: skip
        load_config(Unions, {"pair": [1]})
    with pytest.raises(ConfigError, match=r"^invalid key in 'by_id.a': expected int, got 'a'"):
        load_config(Unions, {"by_id": {"a": 5}})
