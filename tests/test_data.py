"""Tests of mtl.datafiles (reading, checking, label maps) and mtl.data (torch-side pieces)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mtl.config import TrainConfig
from mtl.data import (
    DummyMTLDataset,
    LengthGroupedBatchSampler,
    MTLExamples,
    assign_batches,
    collate,
    dummy_datasets,
    encode_texts,
    schedule_sources,
)
from mtl.datafiles import (
    IGNORE_INDEX,
    LabelMap,
    build_label_maps,
    check_data,
    inspect_records,
    iter_records,
    read_records,
)
from mtl.errors import DataError
from tests.conftest import SHARED_DATA_ROOT, require_shared_data

# ------------------------------------------------------------------------------------ helpers


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def make_config(
    tmp_path: Path, data: dict[str, Any], tasks: list[dict[str, Any]] | None = None, **extra: Any
) -> TrainConfig:
    tasks = tasks or [
        {"name": "topic", "num_classes": 3},
        {"name": "sentiment", "num_classes": 2},
    ]
    return TrainConfig.model_validate({"tasks": tasks, "data": {"kind": "files", **data}, **extra})


TRAIN_CSV = (
    "id,text,topic,sentiment\n"
    '1,"Hello, world",sports,pos\n'
    '2,"She said ""hi""",politics,neg\n'
    "3,plain text,tech,pos\n"
    "4,another one,sports,\n"
    "5,last row,,neg\n"
)


@pytest.fixture
def train_csv(tmp_path: Path) -> Path:
    return write(tmp_path / "train.csv", TRAIN_CSV)


def data_error(fn: Any, *args: Any, **kwargs: Any) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------ parsing


def test_read_csv_quoting_bom_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", b"\xef\xbb\xbf" + TRAIN_CSV.replace("3,", "\n3,").encode())
    rows = read_records(path)
    assert len(rows) == 5
    assert list(rows[0]) == ["id", "text", "topic", "sentiment"]
    assert rows[0]["text"] == "Hello, world"
    assert rows[1]["text"] == 'She said "hi"'
    assert rows[3]["sentiment"] == "" and rows[4]["topic"] == ""
    assert read_records(path, max_rows=2) == rows[:2]


def test_read_jsonl_skips_blank_lines_and_keeps_types(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"text": "a, b", "y": 1}\n\n  \n{"text": "c", "y": null}\n')
    rows = read_records(path, text_column="text")
    assert rows == [{"text": "a, b", "y": 1}, {"text": "c", "y": None}]
    assert read_records([{"text": "x"}]) == [{"text": "x"}]


def test_format_from_suffix_and_explicit(tmp_path: Path) -> None:
    path = write(tmp_path / "data.txt", '{"text": "a"}\n')
    err = data_error(read_records, path)
    assert "data.txt" in str(err) and "format" in str(err)
    assert read_records(path, format="jsonl") == [{"text": "a"}]
    assert read_records(write(tmp_path / "b.json-lines", '{"t": 1}\n')) == [{"t": 1}]


# ------------------------------------------------------------------------------- parse errors


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    err = data_error(read_records, write(tmp_path / "empty.csv", ""))
    assert "empty.csv" in str(err) and "no rows" in str(err)
    err = data_error(read_records, write(tmp_path / "head.csv", "text,topic\n"))
    assert "head.csv" in str(err) and "no rows" in str(err) and "header" in str(err)
    err = data_error(read_records, write(tmp_path / "empty.jsonl", "\n\n"))
    assert "no rows" in str(err)


def test_invalid_utf8_names_row_and_column(tmp_path: Path) -> None:
    data = b"text,topic\nfine,a\nalso fine,b\nbad \xff\xfe byte,c\n"
    err = data_error(read_records, write(tmp_path / "bad.csv", data))
    assert (err.file, err.row, err.column) == (str(tmp_path / "bad.csv"), 3, "text")
    assert "row 3" in str(err) and "column 'text'" in str(err) and "UTF-8" in str(err)
    assert "line 4" in str(err)
    err = data_error(read_records, write(tmp_path / "bad.jsonl", b'{"a": 1}\n\n{"a": "\xc3"}\n'))
    assert err.row == 2 and "line 3" in str(err) and "UTF-8" in str(err)


def test_nul_byte_names_row_and_column(tmp_path: Path) -> None:
    err = data_error(read_records, write(tmp_path / "nul.csv", "text,topic\nok,a\nok,b\x00\n"))
    assert "nul.csv" in str(err) and "row 2" in str(err) and "column 'topic'" in str(err)
    assert "NUL" in str(err)


def test_bad_jsonl_lines(tmp_path: Path) -> None:
    err = data_error(read_records, write(tmp_path / "x.jsonl", '{"text": "a"}\n\n[1, 2]\n'))
    assert "x.jsonl" in str(err) and "row 2" in str(err) and "line 3" in str(err)
    assert "JSON object" in str(err) and "array" in str(err)
    err = data_error(read_records, write(tmp_path / "y.jsonl", '{"text": "a"}\n{"text": \n'))
    assert "row 2" in str(err) and "not valid JSON" in str(err)
    err = data_error(read_records, write(tmp_path / "z.jsonl", '{"a": 1, "a": 2}\n'))
    assert "row 1" in str(err) and "duplicate" in str(err)


def test_csv_structure_errors(tmp_path: Path) -> None:
    err = data_error(read_records, write(tmp_path / "d.csv", "text,topic,text\na,b,c\n"))
    assert "d.csv" in str(err) and "duplicate" in str(err) and "'text'" in str(err)
    err = data_error(read_records, write(tmp_path / "f.csv", "text,topic\na,b\na,b,c\n"))
    assert "row 2" in str(err) and "3 fields" in str(err)
    err = data_error(read_records, write(tmp_path / "q.csv", 'text,topic\n"a,b\n'))
    assert "q.csv" in str(err) and "row 1" in str(err)


def test_missing_file_and_empty_text(tmp_path: Path) -> None:
    err = data_error(read_records, tmp_path / "nope.csv")
    assert "nope.csv" in str(err) and "not found" in str(err)
    path = write(tmp_path / "t.csv", "text,topic\nok,a\n   ,b\n")
    err = data_error(read_records, path, text_column="text")
    assert "t.csv" in str(err) and "row 2" in str(err) and "column 'text'" in str(err)
    assert "empty text" in str(err)


# ------------------------------------------------------------------------------------- labels


def test_string_labels_sorted_and_missing_labels(tmp_path: Path, train_csv: Path) -> None:
    cfg = make_config(tmp_path, {"train": str(train_csv)})
    prepared = check_data(cfg)
    assert prepared is not None
    assert prepared.label_names == {
        "topic": ["politics", "sports", "tech"],
        "sentiment": ["neg", "pos"],
    }
    (src,) = prepared.train
    assert src.texts[0] == "Hello, world" and len(src) == 5
    assert src.labels["topic"] == [1, 0, 2, 1, IGNORE_INDEX]
    assert src.labels["sentiment"] == [1, 0, 1, IGNORE_INDEX, 0]
    assert prepared.class_counts("topic") == [1, 2, 1]
    assert prepared.validation == [] and prepared.test == []


def test_int_labels_configured_names_and_numeric_names(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "a": i % 3, "b": str(i % 2), "r": 1 + i % 5} for i in range(10)]
    path = write_jsonl(tmp_path / "tr.jsonl", rows)
    tasks: list[dict[str, Any]] = [
        {"name": "a", "num_classes": 4},  # ints in range; class 3 never seen
        {"name": "b", "labels": ["no", "yes"]},  # configured names, int ids in data
        {"name": "r", "num_classes": 5},  # 1..5: not ids, so names in numeric order
    ]
    prepared = check_data(make_config(tmp_path, {"train": str(path)}, tasks))
    assert prepared is not None
    assert prepared.label_names == {
        "a": ["0", "1", "2", "3"],
        "b": ["no", "yes"],
        "r": ["1", "2", "3", "4", "5"],
    }
    src = prepared.train[0]
    assert src.labels["a"] == [i % 3 for i in range(10)]
    assert src.labels["b"] == [i % 2 for i in range(10)]
    assert src.labels["r"] == [i % 5 for i in range(10)]


def test_label_map_encode_rules() -> None:
    ids = LabelMap.from_ids("t", 3)
    assert [ids.encode(v) for v in (0, "2", 1.0, "", None, " 1 ")] == [0, 2, 1, -100, -100, 1]
    names = LabelMap.from_names("t", ["neg", "pos"])
    assert names.encode("pos") == 1
    with pytest.raises(DataError, match="unknown label '1'"):
        names.encode(1)  # derived names do not accept ids
    assert LabelMap.from_names("t", ["neg", "pos"], accept_ids=True).encode(1) == 1
    ratings = LabelMap.from_names("t", ["1", "2", "10"])
    assert ratings.encode("10") == 2 and ratings.encode(2) == 1 and ratings.encode("02") == 1


def test_num_classes_mismatch_lists_found_values(tmp_path: Path, train_csv: Path) -> None:
    tasks = [{"name": "topic", "num_classes": 4}, {"name": "sentiment", "num_classes": 2}]
    err = data_error(check_data, make_config(tmp_path, {"train": str(train_csv)}, tasks))
    assert "train.csv" in str(err) and "column 'topic'" in str(err)
    assert "num_classes is 4" in str(err) and "'politics', 'sports', 'tech'" in str(err)
    recs = [{"y": v} for v in (0, 1, 2, 5)]
    cfg = make_config(tmp_path, {"train": "x"}, [{"name": "y", "num_classes": 3}])
    err = data_error(build_label_maps, cfg, {"y": recs}, {"y": "f.csv"})
    assert "[0, 3)" in str(err) and "f.csv" in str(err)


def test_missing_column_lists_available(tmp_path: Path, train_csv: Path) -> None:
    tasks = [{"name": "topic", "num_classes": 3}, {"name": "mood", "num_classes": 2}]
    err = data_error(check_data, make_config(tmp_path, {"train": str(train_csv)}, tasks))
    assert "train.csv" in str(err) and "column 'mood'" in str(err) and "missing column" in str(err)
    assert "'text', 'topic', 'sentiment'" in str(err)
    err = data_error(
        check_data, make_config(tmp_path, {"train": str(train_csv), "text_column": "body"})
    )
    assert "column 'body'" in str(err)


def test_unknown_label_in_validation(tmp_path: Path, train_csv: Path) -> None:
    val = write(tmp_path / "val.csv", "text,topic,sentiment\na,tech,pos\nb,cooking,neg\n")
    err = data_error(
        check_data, make_config(tmp_path, {"train": str(train_csv), "validation": str(val)})
    )
    assert (err.file, err.row, err.column) == (str(val), 2, "topic")
    msg = str(err)
    assert "val.csv" in msg and "row 2" in msg and "column 'topic'" in msg
    assert "'cooking'" in msg and "'politics', 'sports', 'tech'" in msg


def test_out_of_range_int_label(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "tr.jsonl", [{"text": "a", "y": 0}, {"text": "b", "y": 1}])
    val = write_jsonl(tmp_path / "va.jsonl", [{"text": "a", "y": 1}, {"text": "b", "y": 7}])
    cfg = make_config(
        tmp_path, {"train": str(train), "validation": str(val)}, [{"name": "y", "num_classes": 2}]
    )
    err = data_error(check_data, cfg)
    assert "va.jsonl" in str(err) and "row 2" in str(err) and "column 'y'" in str(err)
    assert "out of range" in str(err) and "[0, 2)" in str(err)


def test_row_without_any_label_and_empty_text(tmp_path: Path) -> None:
    path = write(tmp_path / "n.csv", "text,topic,sentiment\na,x,pos\nb,,\n")
    err = data_error(
        check_data,
        make_config(
            tmp_path,
            {"train": str(path)},
            [
                {"name": "topic", "labels": ["x", "y"]},
                {"name": "sentiment", "labels": ["neg", "pos"]},
            ],
        ),
    )
    assert "n.csv" in str(err) and "row 2" in str(err) and "'topic' or 'sentiment'" in str(err)
    path = write(tmp_path / "e.csv", "text,topic,sentiment\na,x,pos\n,y,neg\n")
    err = data_error(
        check_data,
        make_config(
            tmp_path,
            {"train": str(path)},
            [
                {"name": "topic", "labels": ["x", "y"]},
                {"name": "sentiment", "labels": ["neg", "pos"]},
            ],
        ),
    )
    assert "e.csv" in str(err) and "row 2" in str(err) and "column 'text'" in str(err)


# ------------------------------------------------------------------------------ splits/sources


def test_validation_fraction_split(tmp_path: Path) -> None:
    rows = [
        {"text": f"text {i}", "topic": "abc"[i % 3], "sentiment": "np"[i % 2]} for i in range(200)
    ]
    path = write_jsonl(tmp_path / "tr.jsonl", rows)

    def split(seed: int) -> tuple[list[int], list[int]]:
        cfg = make_config(tmp_path, {"train": str(path), "validation_fraction": 0.15}, seed=seed)
        prepared = check_data(cfg)
        assert prepared is not None
        return prepared.train[0].rows, prepared.validation[0].rows

    train_rows, val_rows = split(0)
    assert (len(train_rows), len(val_rows)) == (170, 30)
    assert sorted(train_rows + val_rows) == list(range(1, 201))
    assert split(0) == (train_rows, val_rows)
    assert split(1)[1] != val_rows
    cfg = make_config(tmp_path, {"train": str(path), "validation_fraction": 0.15})
    prepared = check_data(cfg)
    assert prepared is not None
    val = prepared.validation[0]
    assert val.split == "validation" and val.texts[0] == f"text {val.rows[0] - 1}"


def test_per_task_datasets_make_separate_sources(tmp_path: Path) -> None:
    train_csv = write(tmp_path / "main.csv", "text,topic\na,x\nb,y\nc,z\nd,x\ne,y\n")
    nli = write_jsonl(
        tmp_path / "nli.jsonl", [{"sentence": f"s{i}", "label": i % 3} for i in range(6)]
    )
    nli2 = write_jsonl(tmp_path / "nli_val.jsonl", [{"sentence": "v", "label": 2}])
    own = {"train": "dataset:nli", "validation": "dataset:nli-val", "text_column": "sentence"}
    tasks = [
        {"name": "topic", "num_classes": 3},
        {"name": "nli", "num_classes": 3, "label_column": "label", "data": own},
        {"name": "nli2", "num_classes": 3, "label_column": "label", "data": own},
    ]
    files = {"dataset:main": train_csv, "dataset:nli": nli, "dataset:nli-val": nli2}

    def resolve(source: str) -> Path:
        if source not in files:
            raise DataError("unknown dataset", file=source)
        return files[source]

    prepared = check_data(make_config(tmp_path, {"train": "dataset:main"}, tasks), resolve)
    assert prepared is not None
    assert [(s.name, s.file, len(s)) for s in prepared.train] == [
        ("data", "dataset:main", 5),
        ("nli+nli2", "dataset:nli", 6),
    ]
    main, other = prepared.train
    assert main.tasks == ["topic"] and other.tasks == ["nli", "nli2"]
    assert main.labels["nli"] == [IGNORE_INDEX] * 5
    assert other.labels["topic"] == [IGNORE_INDEX] * 6
    assert other.labels["nli"] == other.labels["nli2"] == [0, 1, 2, 0, 1, 2]
    assert [(s.name, len(s)) for s in prepared.validation] == [("nli+nli2", 1)]
    err = data_error(check_data, make_config(tmp_path, {"train": "dataset:zzz"}, tasks), resolve)
    assert "dataset:zzz" in str(err) and "unknown dataset" in str(err)


def test_dummy_config_needs_no_check() -> None:
    cfg = TrainConfig.model_validate(
        {"tasks": [{"name": "a", "num_classes": 2}], "data": {"kind": "dummy", "num_samples": 8}}
    )
    assert check_data(cfg) is None
    train, evals = dummy_datasets(cfg)
    assert len(train) == 8 and evals is not None and len(evals) == 256


def test_inspect_records_caps_values() -> None:
    recs = [{"text": f"t{i}", "y": str(i % 3), "z": i} for i in range(50)] + [{"text": "u"}]
    info = inspect_records(recs, "dataset:abc", max_values=10)
    assert (info.rows, info.columns) == (51, ["text", "y", "z"])
    assert info.label_values["y"] == ["0", "1", "2"] and not info.capped["y"]
    assert info.label_values["z"] == [str(i) for i in range(10)] and info.capped["z"]
    assert info.missing == {"text": 0, "y": 1, "z": 1}
    assert json.loads(json.dumps(info.to_dict()))["source"] == "dataset:abc"


def test_real_data_file(shared_data_dir: Path) -> None:
    path = shared_data_dir / "validation.csv"
    info = inspect_records(read_records(path, text_column="text"), "validation")
    assert info.rows == 2000
    assert info.label_values["department"] == ["Bottoms", "Dresses", "Intimate", "Jackets", "Tops"]


def test_missing_shared_data_skips_but_fails_on_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "shared" / "data" / "nothing_here"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="shared data not present"):
        require_shared_data(missing)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_shared_data(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"nothing_here.*CI=true"):
        require_shared_data(missing)
    missing.mkdir(parents=True)
    assert require_shared_data(missing) == missing
    repo = Path(__file__).resolve().parents[1]
    assert SHARED_DATA_ROOT.relative_to(repo.parent) == Path("shared", "data")  # not absolute


def test_datafiles_imports_no_torch() -> None:
    code = (
        "import mtl.datafiles, sys; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ------------------------------------------------------------------------------------- dummy


def test_dummy_dataset_shapes_range_determinism() -> None:
    tasks = {"a": 3, "b": 4}
    ds = DummyMTLDataset(64, 20, 30522, tasks, seed=3)
    assert ds.input_ids.shape == ds.attention_mask.shape == (64, 20)
    lengths = torch.as_tensor(ds.lengths)
    assert int(lengths.min()) >= 10 and int(lengths.max()) <= 20
    assert torch.equal(ds.attention_mask.sum(1), lengths)
    real = ds.input_ids[ds.attention_mask.bool()]
    assert int(real.min()) >= 1000 and int(real.max()) < 30522
    assert int(ds.input_ids[~ds.attention_mask.bool()].abs().sum()) == 0
    assert all(
        int(ds.labels[t].min()) >= 0 and int(ds.labels[t].max()) < c for t, c in tasks.items()
    )
    again = DummyMTLDataset(64, 20, 30522, tasks, seed=3)
    assert torch.equal(ds.input_ids, again.input_ids)
    assert torch.equal(ds.labels["b"], again.labels["b"])
    other = DummyMTLDataset(64, 20, 30522, tasks, seed=4)
    assert not torch.equal(ds.input_ids, other.input_ids)
    small = DummyMTLDataset(16, 8, 100, tasks, seed=0)
    assert int(small.input_ids[small.attention_mask.bool()].min()) >= 4
    item = ds[5]
    assert len(item["input_ids"]) == ds.lengths[5] and set(item["labels"]) == {"a", "b"}


@pytest.mark.parametrize("vocab", [30522, 64])
def test_dummy_learnable_labels_follow_signal_tokens(vocab: int) -> None:
    tasks = {"a": 3, "b": 5, "c": 2}
    ds = DummyMTLDataset(200, 16, vocab, tasks, learnable=True, seed=0)
    all_signals = [s for sig in ds.signal_tokens.values() for s in sig]
    assert len(set(all_signals)) == 10 and max(all_signals) < min(1000, vocab)
    for t, signals in ds.signal_tokens.items():
        present = torch.stack([(ds.input_ids == s).any(1) for s in signals], dim=1)
        assert torch.equal(present.sum(1), torch.ones(200, dtype=torch.long))  # exactly one
        assert torch.equal(present.long().argmax(1), ds.labels[t])
        count = (ds.input_ids == torch.tensor(signals)[ds.labels[t]].unsqueeze(1)).sum(1)
        share = count.double() / torch.as_tensor(ds.lengths).double()
        assert float(share.mean()) > 0.15
    with pytest.raises(ValueError, match="seq_len"):
        DummyMTLDataset(4, 2, 100, tasks, learnable=True)


# --------------------------------------------------------------------------- tokens and padding


def tiny_tokenizer(tmp_path: Path) -> Any:
    """A 10-word WordPiece tokenizer built offline (AutoTokenizer on a local dir)."""
    from transformers import AutoTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "a", "b", "##s"]
    write(tmp_path / "vocab.txt", "\n".join(words) + "\n")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    write(tmp_path / "tokenizer_config.json", json.dumps(config))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.is_fast and len(tok) == len(words)
    return tok


def test_encode_texts_truncates_without_padding(tmp_path: Path) -> None:
    tok = tiny_tokenizer(tmp_path)
    ids = encode_texts(tok, ["hello worlds", "a", "hello a b world a b"], 6, chunk_size=2)
    assert ids == [[2, 5, 6, 9, 3], [2, 7, 3], [2, 5, 7, 8, 6, 3]]


def test_collate_pads_to_longest() -> None:
    ex = MTLExamples([[2, 5, 3], [2, 3], [2, 5, 6, 7, 3]], {"a": [1, -100, 0], "b": [0, 1, 1]})
    assert ex.lengths.tolist() == [3, 2, 5]
    batch = collate([ex[0], ex[1]], pad_id=9)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    full = ex.batch([0, 1, 2], pad_id=0)
    assert full["input_ids"].shape == full["attention_mask"].shape == (3, 5)
    assert full["input_ids"].dtype == torch.long and full["attention_mask"].dtype == torch.long
    assert full["attention_mask"].sum(1).tolist() == [3, 2, 5]
    assert full["labels"]["a"].tolist() == [1, -100, 0]
    same = collate([ex[i] for i in range(3)])
    assert all(torch.equal(same[k], full[k]) for k in ("input_ids", "attention_mask"))
    ds = DummyMTLDataset(10, 12, 30522, {"a": 2}, seed=0)
    via_items = collate([ds[i] for i in (1, 4, 7)])
    direct = ds.batch([1, 4, 7])
    assert torch.equal(via_items["input_ids"], direct["input_ids"])
    assert torch.equal(via_items["attention_mask"], direct["attention_mask"])
    assert direct["input_ids"].shape[1] == int(ds.lengths[[1, 4, 7]].max())


# ----------------------------------------------------------------------------------- sampling


def test_length_grouped_sampler() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=2000)
    sampler = LengthGroupedBatchSampler(lengths, 16, seed=7, megabatch_mult=50)
    b0 = sampler.batches(0)
    assert sorted(i for b in b0 for i in b) == list(range(2000))
    assert len(b0) == len(sampler) == 125
    assert b0 == LengthGroupedBatchSampler(lengths, 16, seed=7).batches(0)
    assert b0 != sampler.batches(1)
    assert b0 != LengthGroupedBatchSampler(lengths, 16, seed=8).batches(0)

    def spread(batches: list[list[int]]) -> float:
        return float(np.mean([lengths[b].max() - lengths[b].min() for b in batches]))

    plain = LengthGroupedBatchSampler(lengths, 16, seed=7, group_by_length=False).batches(0)
    assert sorted(i for b in plain for i in b) == list(range(2000))
    ratio = spread(b0) / spread(plain)
    assert ratio < 0.1, ratio

    sampler.set_epoch(1, skip=3)
    assert list(sampler) == sampler.batches(1)[3:]
    evals = LengthGroupedBatchSampler(lengths[:50], 16, shuffle=False, group_by_length=False)
    assert evals.batches(0) == [list(range(i, min(i + 16, 50))) for i in range(0, 50, 16)]
    grouped = LengthGroupedBatchSampler(lengths[:50], 16, shuffle=False).batches(0)
    assert sorted(i for b in grouped for i in b) == list(range(50))
    flat = [int(lengths[i]) for b in grouped for i in b]
    assert flat == sorted(flat, reverse=True)
    first = LengthGroupedBatchSampler(lengths, 16, seed=1, longest_first=True).batches(2)
    assert int(lengths[first[0]].max()) == int(lengths.max())
    dropped = LengthGroupedBatchSampler(lengths[:50], 16, drop_last=True).batches(0)
    assert [len(b) for b in dropped] == [16, 16, 16] and len({i for b in dropped for i in b}) == 48


def test_schedule_sources_modes() -> None:
    counts = [100, 20, 5]
    prop = schedule_sources(counts, "proportional", seed=1, epoch=0)
    assert Counter(prop) == {0: 100, 1: 20, 2: 5}
    assert prop == schedule_sources(counts, "proportional", seed=1, epoch=0)
    assert prop != schedule_sources(counts, "proportional", seed=1, epoch=1)
    rr = schedule_sources(counts, "round_robin")
    assert rr[:6] == [0, 1, 2, 0, 1, 2] and Counter(rr) == {0: 100, 1: 100, 2: 100}
    steps = assign_batches(rr, counts)
    assert steps[5] == (2, 1) and steps[3 * 5 + 2] == (2, 0)  # source 2 cycles after 5 batches
    assert sorted(b for s, b in steps if s == 0) == list(range(100))

    def shares(temp: float) -> np.ndarray:
        picks = []
        for seed in range(20):
            picks += schedule_sources(counts, "temperature", temp, seed=seed)
        assert len(picks) == 20 * 125
        return np.bincount(picks, minlength=3) / len(picks)

    np.testing.assert_allclose(shares(1.0), np.array(counts) / 125, atol=0.02)
    np.testing.assert_allclose(shares(100.0), [1 / 3] * 3, atol=0.03)
    t2 = np.sqrt(counts) / np.sqrt(counts).sum()
    np.testing.assert_allclose(shares(2.0), t2, atol=0.02)
    assert schedule_sources([0, 3], "round_robin") == [1, 1, 1]
    assert schedule_sources([0, 0], "temperature", 2.0) == []


# ------------------------------------------------------------------------- caps for uploads


def test_read_caps_csv_columns_and_value_length(tmp_path: Path) -> None:
    """`max_columns` / `max_field_chars` (the upload checks): checked while parsing, the error
    names the data row (blank lines not counted) and the column; the header row has no row."""
    path = write(tmp_path / "a.csv", "text,label\nok,a\n\nfine,b,extra,more\n")
    err = data_error(read_records, path, name="dataset:x", max_columns=3)
    assert str(err) == "dataset:x, row 2: 4 columns; at most 3 are accepted"
    err = data_error(read_records, write(tmp_path / "w.csv", "a,b,c,d\n1,2,3,4\n"), max_columns=3)
    assert (err.row, err.column) == (None, None) and "4 columns; at most 3" in str(err)

    path = write(tmp_path / "b.csv", "text,label\nshort,a\n\n" + "x" * 11 + ",b\n")
    err = data_error(read_records, path, name="dataset:x", max_field_chars=10)
    assert (err.file, err.row, err.column) == ("dataset:x", 2, "text")
    assert str(err) == (
        "dataset:x, row 2, column 'text': a value of 11 characters; at most 10 are accepted"
    )
    header = write(tmp_path / "h.csv", "x" * 11 + "\na\n")
    err = data_error(read_records, header, max_field_chars=10)
    assert (err.row, err.column) == (None, None) and "a value of 11 characters" in str(err)

    # within the caps (and without them) the records are the same
    rows = read_records(path, max_columns=2, max_field_chars=11)
    assert rows == read_records(path) and rows[1]["text"] == "x" * 11


def test_read_caps_csv_field_over_the_csv_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A field the csv module refuses (over `csv.field_size_limit`, at least the cap + 1) is
    reported as too long, not as malformed CSV."""
    import csv

    monkeypatch.setattr("mtl.datafiles.reading.CSV_FIELD_LIMIT", 1)
    old = csv.field_size_limit(6)
    try:
        path = write(tmp_path / "big.csv", "text,label\nok,a\n" + "x" * 50 + ",b\n")
        err = data_error(read_records, path, name="dataset:x", max_field_chars=5)
        assert str(err) == (
            "dataset:x, row 2: a value longer than 5 characters; at most 5 are accepted"
        )
        path = write(tmp_path / "six.csv", "text,label\n" + "x" * 6 + ",b\n")
        err = data_error(read_records, path, max_field_chars=5)
        assert err.row == 1 and err.column == "text" and "a value of 6 characters" in str(err)
    finally:
        csv.field_size_limit(old)


def test_read_caps_jsonl_keys_and_value_length(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a", "y": 1}, {"a": 1, "b": 2, "c": 3}])
    err = data_error(read_records, path, name="dataset:x", max_columns=2)
    assert str(err) == "dataset:x, row 2: 3 keys; at most 2 are accepted"

    rows = [{"text": "ok", "y": 1}, {"text": "y" * 11, "y": 2, "nested": {"n": "z" * 50}}]
    path = write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    err = data_error(read_records, path, name="dataset:x", max_field_chars=10)
    assert (err.file, err.row, err.column) == ("dataset:x", 2, "text")
    assert str(err) == (
        "dataset:x, row 2, column 'text': a value of 11 characters; at most 10 are accepted"
    )
    # only top-level string values count; within the caps the records are the same
    assert read_records(path, max_columns=3, max_field_chars=11) == rows


def test_k_folds_pool_train_and_validation_and_partition_them(tmp_path: Path) -> None:
    """`data.folds`: train and validation pooled, cut into k folds; fold i is validation, the
    rest train; over i = 0..k-1 the validation splits partition the pool; test is untouched."""
    rows = [
        {"text": f"text {i}", "topic": "abc"[i % 3], "sentiment": "np"[i % 2]} for i in range(90)
    ]
    train = write_jsonl(tmp_path / "tr.jsonl", rows[:60])
    val = write_jsonl(tmp_path / "va.jsonl", rows[60:])
    test = write_jsonl(tmp_path / "te.jsonl", rows[:9])
    k = 3

    def fold(index: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
        data = {"train": str(train), "validation": str(val), "test": str(test),
                "folds": {"k": k, "index": index, "seed": seed}}  # fmt: skip
        prepared = check_data(make_config(tmp_path, data))
        assert prepared is not None
        assert len(prepared.train) == len(prepared.validation) == 1
        return prepared.train[0].texts, prepared.validation[0].texts, prepared.test[0].texts

    pool = sorted(r["text"] for r in rows)
    held: list[str] = []
    for index in range(k):
        tr, va, te = fold(index)
        assert len(va) == 30 and len(tr) == 60
        assert sorted(tr + va) == pool and not set(tr) & set(va)
        assert te == [f"text {i}" for i in range(9)]
        held += va
    assert sorted(held) == pool  # every example is validation exactly once
    assert fold(0) == fold(0) and fold(0, seed=1)[1] != fold(0)[1]
    # the labels travel with their texts
    prepared = check_data(
        make_config(
            tmp_path, {"train": str(train), "validation": str(val), "folds": {"k": 3, "index": 1}}
        )
    )
    assert prepared is not None
    source = prepared.validation[0]
    for text, topic in zip(source.texts, source.labels["topic"], strict=True):
        i = int(text.split()[1])
        assert prepared.label_names["topic"][topic] == "abc"[i % 3]


@pytest.mark.parametrize(
    ("folds", "extra", "message"),
    [
        ({"k": 3, "index": 3}, {}, "index 3 is not one of the 3 folds"),
        ({"k": 1}, {}, "greater than or equal to 2"),
        ({"k": 3}, {"validation_fraction": 0.1}, "not both"),
    ],
)
def test_bad_folds_are_refused(
    tmp_path: Path, folds: dict[str, int], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        make_config(tmp_path, {"train": "x.csv", "folds": folds, **extra})


@pytest.mark.parametrize(
    ("line", "words", "column"),
    [
        ('{"text": "a\\ud800b", "topic": "x"}', "not valid Unicode", "text"),
        ('{"text": "ok", "topic": ["\\udfff"]}', "not valid Unicode", "topic"),
        ('{"te\\ud800xt": "ok", "topic": "x"}', "not valid Unicode", None),
        ("[" * 50_000 + "]" * 50_000, "nested too deeply", None),
    ],
    ids=["surrogate in a value", "surrogate nested in a value", "surrogate in a key", "deep"],
)
def test_jsonl_rows_that_no_utf8_text_holds_are_data_errors(
    tmp_path: Path, line: str, words: str, column: str | None
) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "fine", "topic": "y"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=words) as caught:
        read_records(path)
    assert caught.value.row == 2 and caught.value.column == column


# ------------------------------------------------------------------------- streaming

#: Inputs whose line ends, multi-byte characters, BOM or bad bytes can fall on a chunk border.
STREAMED: dict[str, tuple[str, bytes]] = {
    "CRLF, quoted newlines, BOM": (
        "csv",
        b'\xef\xbb\xbftext,label\r\n"two\r\nlines",a\r\n\r\nplain,b\r\n"say ""hi""",c',
    ),
    "lone CR line ends": ("csv", b"text,label\rone,a\r\rtwo,b\r"),
    "multi-byte characters": ("csv", "text,label\nça va,é\n€ 😀,ü\n".encode()),
    "invalid UTF-8 late": ("csv", b"text,label\nok,a\n\nfine,b\nbad \xe2\x82 end,c\n"),
    "truncated at the end": ("csv", b"text,label\nok,a\nbad \xc3"),
    "NUL late": ("csv", b"text,label\r\nok,a\r\nok,b\x00\r\n"),
    "NUL before invalid UTF-8": ("csv", b"text,label\nok,\x00\nbad \xff,b\n"),
    "malformed quote, then invalid UTF-8": ("csv", b'text,label\n"ok"x,a\nbad \xff,b\n'),
    "BOM only": ("csv", b"\xef\xbb\xbf"),
    "JSONL": ("jsonl", '{"t": "é😀"}\r\n\n{"t": 2}\n'.encode()),
    "JSONL, invalid UTF-8 late": ("jsonl", b'{"t": 1}\n\n{"t": "\xf0\x9f\x98"}\n'),
}


def _outcome(path: Path) -> tuple[Any, ...]:
    try:
        return ("rows", read_records(path, name="f"))
    except DataError as err:
        return ("error", str(err), err.row, err.column)


@pytest.mark.parametrize("case", list(STREAMED), ids=list(STREAMED))
def test_reading_does_not_depend_on_the_chunk_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """`iter_records` decodes and splits lines chunk by chunk: with chunks of 1, 2, 3, 5 or 64
    bytes the rows, or the error with its row, column, line and byte offset, are those read
    in one chunk."""
    fmt, data = STREAMED[case]
    path = write(tmp_path / f"x.{fmt}", data)
    monkeypatch.setattr("mtl.datafiles.reading.CHUNK_BYTES", 1 << 20)
    expected = _outcome(path)
    for size in (1, 2, 3, 5, 64):
        monkeypatch.setattr("mtl.datafiles.reading.CHUNK_BYTES", size)
        assert _outcome(path) == expected, size


def test_streamed_errors_name_row_column_line_and_offset(tmp_path: Path) -> None:
    outcome = {}
    for i, (case, (fmt, data)) in enumerate(STREAMED.items()):
        outcome[case] = _outcome(write(tmp_path / f"{i}.{fmt}", data))
    assert outcome["CRLF, quoted newlines, BOM"][1] == [
        {"text": "two\r\nlines", "label": "a"},
        {"text": "plain", "label": "b"},
        {"text": 'say "hi"', "label": "c"},
    ]
    assert outcome["lone CR line ends"][1] == [
        {"text": "one", "label": "a"},
        {"text": "two", "label": "b"},
    ]
    assert outcome["invalid UTF-8 late"] == (
        "error",
        "f, row 3, column 'text': not valid UTF-8: bytes e2 82 at byte offset 28 (line 5); "
        "save the file as UTF-8",
        3,
        "text",
    )
    assert outcome["truncated at the end"][1:] == (
        "f, row 2, column 'text': not valid UTF-8: bytes c3 at byte offset 20 (line 3); "
        "save the file as UTF-8",
        2,
        "text",
    )
    assert outcome["NUL late"][2:] == (2, "label") and "NUL byte (line 3)" in outcome["NUL late"][1]
    # the first problem in the file is the one reported
    assert outcome["NUL before invalid UTF-8"][1].startswith(
        "f, row 1, column 'label': contains a NUL"
    )
    assert "malformed CSV near line 2" in outcome["malformed quote, then invalid UTF-8"][1]
    assert outcome["BOM only"][1] == "f: no rows: the file is empty"
    assert outcome["JSONL"][1] == [{"t": "é😀"}, {"t": 2}]
    assert outcome["JSONL, invalid UTF-8 late"][1:] == (
        "f, row 2: not valid UTF-8: bytes f0 9f 98 at byte offset 17 (line 3); "
        "save the file as UTF-8",
        2,
        None,
    )


def test_iter_records_yields_rows_before_a_late_problem(tmp_path: Path) -> None:
    """Rows come one at a time as the file is read; a problem further on is raised when the
    reading gets there (a caller must finish the iteration before trusting the rows)."""
    path = write(tmp_path / "late.csv", b"text,label\nok,a\n\nfine,b\nbad \xe2\x82 end,c\n")
    rows = iter_records(path, name="dataset:x")
    assert next(rows) == {"text": "ok", "label": "a"}
    assert next(rows) == {"text": "fine", "label": "b"}
    err = data_error(next, rows)
    assert (err.row, err.column) == (3, "text") and "not valid UTF-8" in str(err)
    # the format is checked at once; the file is opened on the first row
    err = data_error(iter_records, tmp_path / "notes.txt")
    assert "format" in str(err)
    missing = iter_records(tmp_path / "nope.csv")
    assert "not found" in str(data_error(next, missing))


def test_reading_and_inspecting_a_file_holds_a_chunk_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`inspect_records` over `iter_records` (64 KiB chunks here): the peak of Python
    allocations (tracemalloc) is a few chunks, well under the file's size, and the same for
    20 000 and 80 000 short unique rows (reading the whole file into records took many times
    its size)."""
    import tracemalloc

    monkeypatch.setattr("mtl.datafiles.reading.CHUNK_BYTES", 64 * 1024)

    def peak(rows: int) -> tuple[int, int]:
        path = tmp_path / f"{rows}.csv"
        with open(path, "w") as f:
            f.write("id,text,label\n")
            f.writelines(f"{i},short review number {i},{'abc'[i % 3]}\n" for i in range(rows))
        tracemalloc.start()
        try:
            info = inspect_records(iter_records(path), "x", max_values=100)
            top = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert info.rows == rows and info.label_values["label"] == ["a", "b", "c"]
        assert info.label_values["id"] == [str(i) for i in range(100)] and info.capped["id"]
        return top, path.stat().st_size

    (small, _), (large, size) = peak(20_000), peak(80_000)
    print(f"peak {small / 2**20:.2f} MiB, {large / 2**20:.2f} MiB (file {size / 2**20:.1f} MiB)")
    assert large < size / 2, (large, size)
    assert large < small * 1.25 + 2**18, (small, large)


def test_inspect_records_streams_with_bounded_values() -> None:
    """One pass over a generator: the distinct values listed are the `max_values` smallest in
    `_sort_keys` order (numeric while every value is an integer), `capped` says there were
    more, and a column that first appears late is missing in the rows before."""
    rng = np.random.default_rng(0)
    ints = [int(v) for v in rng.integers(-5000, 5000, size=20_000)]

    def rows() -> Any:
        for i, v in enumerate(ints):
            rec: dict[str, Any] = {"n": v, "s": str(v)}
            if i >= 15_000:
                rec["late"] = "x" if i % 2 else ""
            yield rec
        yield {"n": None, "s": "not a number", "late": "y"}

    info = inspect_records(rows(), "x", max_values=7)
    assert info.rows == 20_001 and info.columns == ["n", "s", "late"]
    assert info.label_values["n"] == [str(v) for v in sorted(set(ints))[:7]]
    assert info.label_values["s"] == sorted({str(v) for v in ints} | {"not a number"})[:7]
    assert info.capped == {"n": True, "s": True, "late": False}
    assert info.label_values["late"] == ["x", "y"]
    assert info.missing == {"n": 1, "s": 0, "late": 15_000 + 2_500}
