"""Config validation: every bad config gets an error naming the field; load_config on files;
bad data found by check_data names file, row and column."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from mtl.config import TrainConfig, load_config
from mtl.datafiles import check_data
from mtl.errors import ConfigError, DataError, MTLError

Mutate = Callable[[dict[str, Any]], None]


def _tasks(n: int) -> list[dict[str, Any]]:
    return [{"name": f"t{i}", "num_classes": 2} for i in range(n)]


def _set(path: str, value: Any) -> Mutate:
    def mutate(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = cfg
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


# (mutation of a valid config, substrings the error must contain)
BAD_CONFIGS: dict[str, tuple[Mutate, list[str]]] = {
    "duplicate_task_names": (
        _set("tasks", [{"name": "a", "num_classes": 2}, {"name": "a", "num_classes": 3}]),
        ["duplicate task names: a"],
    ),
    "no_tasks": (_set("tasks", []), ["tasks: List should have at least 1 item"]),
    "17_tasks": (_set("tasks", _tasks(17)), ["tasks: List should have at most 16 items"]),
    "num_classes_1": (_set("tasks.0.num_classes", 1), ["tasks.0.num_classes", "2"]),
    "num_classes_1001": (_set("tasks.0.num_classes", 1001), ["tasks.0.num_classes", "1000"]),
    "no_classes": (
        _set("tasks.0", {"name": "task_a"}),
        ["tasks.0", "task 'task_a': give num_classes or labels"],
    ),
    "labels_mismatch": (
        _set("tasks.0.labels", ["x", "y"]),
        ["tasks.0", "task 'task_a': num_classes=5 but 2 labels"],
    ),
    "duplicate_labels": (
        _set("tasks.0", {"name": "task_a", "labels": ["x", "x"]}),
        ["tasks.0.labels", "labels must be unique"],
    ),
    "bad_task_name": (_set("tasks.0.name", "has space"), ["tasks.0.name", "pattern"]),
    "class_weights_length": (
        _set("tasks.1.class_weights", [1.0, 2.0]),
        ["tasks.1", "class_weights has 2 values for 3 classes"],
    ),
    "unknown_top_level_field": (_set("epochz", 3), ["epochz: Extra inputs are not permitted"]),
    "unknown_nested_field": (
        _set("optimizer.momentun", 0.5),
        ["optimizer.momentun: Extra inputs are not permitted"],
    ),
    "nan_lr": (_set("optimizer.lr", float("nan")), ["optimizer.lr"]),
    "nan_grad_clip": (_set("grad_clip", float("nan")), ["grad_clip"]),
    "inf_grad_clip": (_set("grad_clip", float("inf")), ["grad_clip", "must be a finite number"]),
    "inf_task_grad_clip": (
        _set("tasks.1.grad_clip", float("inf")),
        ["tasks.1.grad_clip", "must be a finite number"],
    ),
    "negative_batch_size": (_set("batch_size", -1), ["batch_size", "greater than or equal to 1"]),
    "huge_batch_size": (_set("batch_size", 100_000), ["batch_size", "less than or equal to 4096"]),
    "huge_max_length": (
        _set("encoder.max_length", 100_000),
        ["encoder.max_length", "less than or equal to 8192"],
    ),
    "huge_epochs": (_set("epochs", 1_000_000), ["epochs", "less than or equal to 1000"]),
    "static_weights_missing_task": (
        _set("weighting", {"name": "static", "weights": {"task_a": 1.0}}),
        ["static weights must name every task once", "missing ['task_b']"],
    ),
    "static_both_forms": (
        _set("weighting", {"name": "static", "alpha": 0.5, "weights": {"task_a": 1, "task_b": 1}}),
        ["weighting.static", "exactly one of `weights` or `alpha`"],
    ),
    "static_negative_weight": (
        _set("weighting", {"name": "static", "weights": {"task_a": -1.0, "task_b": 1.0}}),
        ["weighting.static", "weight for 'task_a' must be finite and >= 0"],
    ),
    "alpha_with_3_tasks": (
        lambda c: c.update(
            tasks=[*c["tasks"], {"name": "task_c", "num_classes": 2}],
            weighting={"name": "static", "alpha": 0.3},
        ),
        ["static weighting with alpha needs exactly two tasks"],
    ),
    "unknown_weighting": (_set("weighting", {"name": "magic"}), ["weighting", "magic"]),
    "monitor_unknown_task": (
        _set("monitor", "nope/accuracy"),
        ["monitor 'nope/accuracy'", "['task_a', 'task_b']"],
    ),
    "monitor_unknown_metric": (_set("monitor", "mean/auc"), ["monitor 'mean/auc'"]),
    "per_task_data_with_dummy_data": (
        _set("tasks.0.data", {"train": "a.csv"}),
        ["task 'task_a': per-task data needs data.kind='files'"],
    ),
    "random_init_huge_hidden_size": (
        _set("encoder.random_init.hidden_size", 1_000_000),
        ["encoder.random_init.hidden_size", "less than or equal to 4096"],
    ),
    "random_init_remote_code": (
        _set("encoder.random_init.auto_map", {"AutoModel": "x.Y"}),
        ["encoder.random_init.auto_map: Extra inputs are not permitted"],
    ),
    "random_init_unlisted_key": (
        _set("encoder.random_init.name_or_path", "https://evil.example/m"),
        ["encoder.random_init.name_or_path: Extra inputs are not permitted"],
    ),
    "random_init_bool_size": (
        _set("encoder.random_init.num_hidden_layers", True),
        ["encoder.random_init.num_hidden_layers", "not a boolean"],
    ),
    "random_init_unknown_activation": (
        _set("encoder.random_init.hidden_act", "swish2"),
        ["encoder.random_init.hidden_act", "'gelu'"],
    ),
    "random_init_heads_do_not_divide_hidden": (
        _set("encoder.random_init.num_attention_heads", 5),
        ["encoder.random_init", "must be a multiple of num_attention_heads (5)"],
    ),
    "dummy_vocab_beyond_random_init_vocab": (
        _set("data.vocab_size", 10**5),
        ["data.vocab_size (100000) exceeds the encoder's vocabulary"],
    ),
    "dummy_seq_len_beyond_random_init_positions": (
        _set("data.seq_len", 4096),
        ["data.seq_len (4096) exceeds the encoder's positions"],
    ),
    "validation_fraction_too_big": (
        _set("data", {"kind": "files", "train": "a.csv", "validation_fraction": 0.5}),
        ["data.files.validation_fraction", "less than 0.5"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_rejected_naming_the_field(
    case: str, config_dict: Any, tmp_path: Path
) -> None:
    mutate, expected = BAD_CONFIGS[case]
    raw = config_dict()
    TrainConfig.model_validate(raw)  # the base is valid
    mutate(raw)
    with pytest.raises(ValidationError):
        TrainConfig.model_validate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid config")
    for part in expected:
        assert part in message, (part, message)


def test_the_example_config_validates() -> None:
    config = load_config(Path(__file__).parents[1] / "examples" / "dummy_two_task.yaml")
    assert config.task_names == ["task_a", "task_b"]
    assert [t.n_classes for t in config.tasks] == [5, 3]
    assert config.data.kind == "dummy" and config.data.learnable


def test_yaml_and_json_files_load_the_same_config(config_dict: Any, tmp_path: Path) -> None:
    raw = config_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(raw), encoding="utf-8")
    a, b = load_config(tmp_path / "c.yaml"), load_config(str(tmp_path / "c.json"))
    assert a == b == TrainConfig.model_validate(raw)
    # labels fill in num_classes
    raw["tasks"][0] = {"name": "task_a", "labels": ["x", "y", "z"]}
    assert TrainConfig.model_validate(raw).tasks[0].n_classes == 3


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.yaml", "tasks: [unclosed\n  - x: : :\n", "not valid yaml"),
        ("bad.json", '{"tasks": [}', "not valid json"),
        ("list.yaml", "- a\n- b\n", "the config must be a mapping at the top level"),
        ("empty.yaml", "", "the config must be a mapping at the top level"),
    ],
)
def test_unreadable_config_files_are_config_errors_naming_the_file(
    name: str, text: str, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)
    assert isinstance(info.value, MTLError) and isinstance(info.value, ValueError)


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_load_config_of_a_bad_dict_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tasks"):
        load_config({"tasks": [], "data": {"kind": "dummy"}})


def test_assignment_is_validated_too(make_config: Any) -> None:
    config = make_config()
    with pytest.raises(ValidationError, match="batch_size"):
        config.batch_size = 0


# -------------------------------------------------------------------------------- bad data


def _files_config(make_config: Any, train: Path, **task_b: Any) -> Any:
    return make_config(
        tasks=[
            {"name": "task_a", "labels": ["x", "y"]},
            {"name": "task_b", "num_classes": 2, **task_b},
        ],
        data={"kind": "files", "train": str(train)},
    )


def test_check_data_names_the_missing_column(
    make_config: Any, write_rows: Any, tmp_path: Path
) -> None:
    path = write_rows(tmp_path / "t.csv", [{"text": "hi", "task_a": "x"}] * 3)
    with pytest.raises(DataError) as info:
        check_data(_files_config(make_config, path))
    err = info.value
    assert (err.file, err.row, err.column) == (str(path), None, "task_b")
    assert str(err).startswith(f"{path}, column 'task_b': missing column")
    assert "'text', 'task_a'" in str(err)


def test_check_data_names_the_row_of_an_unknown_label(
    make_config: Any, write_rows: Any, tmp_path: Path
) -> None:
    rows = [{"text": f"t{i}", "task_a": "x", "task_b": i % 2} for i in range(4)]
    rows[2]["task_a"] = "zzz"
    path = write_rows(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as info:
        check_data(_files_config(make_config, path))
    err = info.value
    assert (err.file, err.row, err.column) == (str(path), 3, "task_a")
    assert "unknown label 'zzz'" in str(err) and "'x', 'y'" in str(err)
    assert str(err).startswith(f"{path}, row 3, column 'task_a': ")


def test_check_data_accepts_good_files_and_keeps_label_names(
    make_config: Any, write_rows: Any, tmp_path: Path
) -> None:
    rows = [{"text": f"t{i}", "task_a": "xy"[i % 2], "task_b": i % 2} for i in range(6)]
    rows[1]["task_b"] = ""  # a missing label: the row still trains task_a
    path = write_rows(tmp_path / "t.csv", rows)
    prepared = check_data(_files_config(make_config, path))
    assert prepared is not None
    assert prepared.label_names == {"task_a": ["x", "y"], "task_b": ["0", "1"]}
    assert prepared.class_counts("task_b") == [3, 2]
    assert check_data(make_config()) is None  # dummy data: nothing to read
