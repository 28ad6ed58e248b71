"""mtl.metrics against scikit-learn on fixed predictions: the evaluation report, the mean over
tasks and the running training statistics.

The zero-division conventions are sklearn's with ``zero_division=0``: a class that is never
predicted has precision 0, a class absent from the targets has recall 0, and their F1 is 0.
Macro-F1 averages over the classes that occur in the targets or the predictions, which is
sklearn's default (``labels=None``); per-class scores and the confusion matrix list every
configured class (``labels=range(n)``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from mtl.metrics import RunningStats, classification_report, mean_over_tasks

ABS = 1e-6  # torchmetrics computes in float32

#: name -> (class names, targets, predictions)
CASES: dict[str, tuple[list[str], list[int], list[int]]] = {
    # class "c" (2) is in the targets but never predicted; class "d" (3) is predicted but
    # never a target
    "unpredicted_and_absent": (
        ["a", "b", "c", "d"],
        [0, 0, 0, 1, 1, 2, 2, 2, 0, 1, 1, 0],
        [0, 1, 0, 1, 3, 0, 1, 3, 0, 1, 1, 3],
    ),
    # class "z" (2) occurs nowhere: it is left out of macro-F1, reported with zeros
    "perfect_with_an_unused_class": (["x", "y", "z"], [0, 1, 1, 0, 1], [0, 1, 1, 0, 1]),
    "all_wrong": (["neg", "pos"], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]),
    # one target class, predicted partly as a class that is never a target
    "one_target_class": (["p", "q", "r"], [2, 2, 2, 2], [2, 2, 1, 2]),
    "imbalanced_five": (
        ["0", "1", "2", "3", "4"],
        [4, 4, 4, 4, 4, 4, 1, 1, 0, 3, 3, 4, 0],
        [4, 4, 4, 1, 4, 0, 1, 4, 0, 3, 4, 4, 4],
    ),
}


def report_of(case: str, loss: float = 0.25) -> dict[str, Any]:
    labels, y, p = CASES[case]
    return classification_report(torch.tensor(p), torch.tensor(y), labels, loss)


@pytest.mark.parametrize("case", list(CASES))
def test_classification_report_matches_sklearn(case: str) -> None:
    labels, y, p = CASES[case]
    n = len(labels)
    report = report_of(case, loss=0.75)
    every = list(range(n))

    assert report["loss"] == 0.75 and report["n"] == len(y) and report["labels"] == labels
    assert report["accuracy"] == pytest.approx(accuracy_score(y, p), abs=ABS)
    macro = f1_score(y, p, average="macro", zero_division=0)  # classes in y or p
    assert report["macro_f1"] == pytest.approx(macro, abs=ABS)
    weighted = f1_score(y, p, labels=every, average="weighted", zero_division=0)
    assert report["weighted_f1"] == pytest.approx(weighted, abs=ABS)
    assert report["confusion_matrix"] == confusion_matrix(y, p, labels=every).tolist()

    precision, recall, f1, support = precision_recall_fscore_support(
        y, p, labels=every, average=None, zero_division=0
    )
    assert list(report["per_class"]) == labels
    for i, label in enumerate(labels):
        scores = report["per_class"][label]
        assert scores["precision"] == pytest.approx(precision[i], abs=ABS), label
        assert scores["recall"] == pytest.approx(recall[i], abs=ABS), label
        assert scores["f1"] == pytest.approx(f1[i], abs=ABS), label
        assert scores["support"] == int(support[i]), label


def test_classification_report_hand_values() -> None:
    """The first case by hand, so the sklearn comparison cannot hide a shared mistake."""
    report = report_of("unpredicted_and_absent")
    per = report["per_class"]
    # a: 3 of its 4 predictions right, 3 of its 5 targets found; b: 3 of 5, 3 of 4;
    # c: 3 targets, never predicted; d: predicted 3 times, never a target
    third = {"f1": 2 / 3}
    assert per["a"] == pytest.approx({"precision": 0.75, "recall": 0.6, **third, "support": 5})
    assert per["b"] == pytest.approx({"precision": 0.6, "recall": 0.75, **third, "support": 4})
    assert per["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    assert per["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["accuracy"] == pytest.approx(6 / 12, abs=ABS)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 4, abs=ABS)  # d counts: predicted
    assert report["weighted_f1"] == pytest.approx((2 / 3 * 5 + 2 / 3 * 4) / 12, abs=ABS)
    assert report["confusion_matrix"] == [[3, 1, 0, 1], [0, 3, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0]]
    unused = report_of("perfect_with_an_unused_class")
    assert unused["macro_f1"] == pytest.approx(1.0, abs=ABS)  # sklearn with labels=range(3): 2/3
    assert unused["per_class"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_classification_report_of_an_empty_split() -> None:
    # mtl's documented convention (sklearn has no answer for no samples): zeros, n = 0, and a
    # zero confusion matrix of the configured size
    report = classification_report(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), ["a", "b", "c"], 1.5
    )
    assert report["n"] == 0 and report["loss"] == 1.5
    assert report["accuracy"] == report["macro_f1"] == report["weighted_f1"] == 0.0
    assert report["per_class"] == {}
    assert report["confusion_matrix"] == [[0, 0, 0]] * 3


def test_mean_over_tasks_averages_the_scored_tasks() -> None:
    reports = {
        "t1": report_of("unpredicted_and_absent", loss=0.5),
        "t2": report_of("all_wrong", loss=1.5),
        "t3": report_of("imbalanced_five", loss=2.5),
        "empty": classification_report(
            torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), ["a", "b"], 9.0
        ),
    }
    mean = mean_over_tasks(reports)
    assert set(mean) == {"loss", "accuracy", "macro_f1", "weighted_f1"}
    assert mean["loss"] == pytest.approx(1.5)  # the empty task (loss 9) is left out
    cases = ["unpredicted_and_absent", "all_wrong", "imbalanced_five"]
    expected = {
        "accuracy": np.mean([accuracy_score(CASES[c][1], CASES[c][2]) for c in cases]),
        "macro_f1": np.mean(
            [f1_score(CASES[c][1], CASES[c][2], average="macro", zero_division=0) for c in cases]
        ),
        "weighted_f1": np.mean(
            [f1_score(CASES[c][1], CASES[c][2], average="weighted", zero_division=0) for c in cases]
        ),
    }
    for key, value in expected.items():
        assert mean[key] == pytest.approx(float(value), abs=ABS), key
    assert mean_over_tasks({"empty": reports["empty"]}) == dict.fromkeys(mean, 0.0)
    assert mean_over_tasks({}) == dict.fromkeys(mean, 0.0)


# ----------------------------------------------------------------------------- RunningStats

#: Two training batches of three tasks; -100 marks rows without a label for that task.
BATCHES: list[dict[str, tuple[float, list[int], list[int]]]] = [
    {  # task -> (mean loss over its labelled rows, targets, predictions)
        "a": (1.2, [0, 1, 2, -100, 3], [0, 2, 2, 1, 0]),
        "b": (0.4, [1, 1, -100, -100, 0], [1, 0, 0, 0, 0]),
        "c": (7.0, [-100, -100, -100, -100, -100], [0, 1, 0, 1, 0]),
    },
    {
        "a": (0.6, [3, 3, 0, -100], [3, 1, 0, 0]),
        "b": (0.9, [0, 1, 1, 1], [0, 1, 1, 0]),
        "c": (5.0, [-100, -100, -100, -100], [1, 1, 1, 1]),
    },
]
TOTALS = [2.5, 1.75]


def fill(stats: RunningStats) -> None:
    for batch, total in zip(BATCHES, TOTALS, strict=True):
        for i, name in enumerate(stats.names):
            loss, y, p = batch[name]
            if all(v == -100 for v in y):
                continue  # the trainer adds only the tasks present in a batch
            stats.add(i, torch.tensor(loss), torch.tensor(p), torch.tensor(y))
        stats.add_total(torch.tensor(total))


def expected_flush(task: str) -> dict[str, float]:
    losses: list[float] = []  # each labelled row carries its batch's mean loss
    y: list[int] = []
    p: list[int] = []
    for batch in BATCHES:
        loss, targets, preds = batch[task]
        for target, pred in zip(targets, preds, strict=True):
            if target != -100:
                losses.append(loss)
                y.append(target)
                p.append(pred)
    return {
        "loss": sum(losses) / len(losses),
        "accuracy": accuracy_score(y, p),
        "macro_f1": f1_score(y, p, average="macro", zero_division=0),
    }


def test_running_stats_flush_matches_sklearn() -> None:
    stats = RunningStats(["a", "b", "c"], [4, 2, 2], torch.device("cpu"))
    fill(stats)
    out = stats.flush()
    assert out["loss"] == pytest.approx(sum(TOTALS) / 2)
    assert set(out["tasks"]) == {"a", "b"}  # "c" had no labelled row: not reported
    for task in ("a", "b"):
        expected = expected_flush(task)
        assert out["tasks"][task] == pytest.approx(expected, abs=ABS), task
    # by hand for "a": losses (1.2 x 4 rows + 0.6 x 3) / 7; 4 of 7 right; macro over 0..3
    assert out["tasks"]["a"]["loss"] == pytest.approx((1.2 * 4 + 0.6 * 3) / 7)
    assert out["tasks"]["a"]["accuracy"] == pytest.approx(4 / 7)
    # flushing resets: nothing to report until the next add
    assert stats.flush() == {"tasks": {}, "loss": 0.0}


def test_running_stats_state_round_trip_mid_log() -> None:
    stats = RunningStats(["a", "b", "c"], [4, 2, 2], torch.device("cpu"))
    fill(stats)
    restored = RunningStats(["a", "b", "c"], [4, 2, 2], torch.device("cpu"))
    restored.load_state_dict(stats.state_dict())
    ours, theirs = stats.flush(), restored.flush()
    assert theirs["loss"] == pytest.approx(ours["loss"], abs=1e-12)
    assert theirs["tasks"] == ours["tasks"]
    assert all(math.isfinite(v) for m in ours["tasks"].values() for v in m.values())
