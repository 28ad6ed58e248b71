"""Evaluation metrics per task (torchmetrics) and the running training statistics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

__all__ = ["RunningStats", "classification_report", "mean_over_tasks"]


def classification_report(
    preds: Tensor, target: Tensor, labels: list[str], loss: float
) -> dict[str, Any]:
    """Loss, accuracy, macro/weighted F1, per-class P/R/F1/support and the confusion matrix."""
    n = len(labels)
    if target.numel() == 0:
        return {
            "loss": loss,
            "accuracy": 0.0,
            "macro_f1": 0.0,
            "weighted_f1": 0.0,
            "n": 0,
            "labels": labels,
            "per_class": {},
            "confusion_matrix": [[0] * n for _ in range(n)],
        }
    kw: dict[str, Any] = {"num_classes": n, "validate_args": False}
    cm = multiclass_confusion_matrix(preds, target, **kw)
    precision = multiclass_precision(preds, target, average="none", zero_division=0, **kw)
    recall = multiclass_recall(preds, target, average="none", zero_division=0, **kw)
    f1 = multiclass_f1_score(preds, target, average="none", zero_division=0, **kw)
    support = cm.sum(dim=1)
    # Macro-F1 over every class (a class absent from this split scores 0 only if predicted).
    present = (support > 0) | (cm.sum(dim=0) > 0)
    macro = float(f1[present].mean()) if bool(present.any()) else 0.0
    weighted = float((f1 * support).sum() / support.sum().clamp(min=1))
    return {
        "loss": loss,
        "accuracy": float((preds == target).float().mean()),
        "macro_f1": macro,
        "weighted_f1": weighted,
        "n": int(target.numel()),
        "labels": labels,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
    }


def mean_over_tasks(reports: dict[str, dict[str, Any]]) -> dict[str, float]:
    keys = ("loss", "accuracy", "macro_f1", "weighted_f1")
    scored = [r for r in reports.values() if r.get("n", 0) > 0]
    if not scored:
        return {k: 0.0 for k in keys}
    return {k: sum(float(r[k]) for r in scored) / len(scored) for k in keys}


class RunningStats:
    """Per-task loss, accuracy and macro-F1 between two training logs.

    `add` keeps tensors on the device (no host sync on the training step); `flush` syncs once
    per log and computes the metrics (torchmetrics for F1).
    """

    def __init__(self, task_names: list[str], num_classes: list[int], device: torch.device):
        self.names = list(task_names)
        self.num_classes = list(num_classes)
        self.device = device
        self.reset()

    def reset(self) -> None:
        t = len(self.names)
        self.loss_sum = torch.zeros(t, dtype=torch.float64, device=self.device)
        self.rows = torch.zeros(t, dtype=torch.float64, device=self.device)
        self.total_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.steps = 0
        self.preds: list[list[Tensor]] = [[] for _ in self.names]
        self.targets: list[list[Tensor]] = [[] for _ in self.names]

    def add(self, index: int, loss: Tensor, preds: Tensor, target: Tensor) -> None:
        """`loss` is the task's mean over its labelled rows; `target` holds -100 where a row has
        no label for this task."""
        count = (target != -100).sum()
        self.loss_sum[index] += loss.detach().double() * count
        self.rows[index] += count
        self.preds[index].append(preds)
        self.targets[index].append(target)

    def add_total(self, total: Tensor) -> None:
        self.total_sum += total.detach().double()
        self.steps += 1

    def flush(self) -> dict[str, Any]:
        sums = torch.stack([self.loss_sum, self.rows]).cpu()
        total = float(self.total_sum) / max(self.steps, 1)
        tasks = {}
        for i, name in enumerate(self.names):
            n = float(sums[1, i])
            if n <= 0:
                continue
            target = torch.cat(self.targets[i]).cpu()
            preds = torch.cat(self.preds[i]).cpu()
            keep = target != -100
            target, preds = target[keep], preds[keep]
            f1 = multiclass_f1_score(
                preds, target, num_classes=self.num_classes[i], average="none", zero_division=0
            )
            seen = torch.bincount(target, minlength=self.num_classes[i]) > 0
            seen |= torch.bincount(preds, minlength=self.num_classes[i]) > 0
            tasks[name] = {
                "loss": float(sums[0, i]) / n,
                "accuracy": float((preds == target).double().mean()),
                "macro_f1": float(f1[seen].mean()),
            }
        self.reset()
        return {"tasks": tasks, "loss": total}

    def state_dict(self) -> dict[str, Any]:
        def joined(parts: list[Tensor]) -> Tensor:
            return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.long)

        return {
            "loss_sum": self.loss_sum.cpu(),
            "rows": self.rows.cpu(),
            "total_sum": self.total_sum.cpu(),
            "steps": torch.tensor(self.steps),
            "preds": [joined(p) for p in self.preds],
            "targets": [joined(t) for t in self.targets],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        self.rows = state["rows"].to(self.device)
        self.total_sum = state["total_sum"].to(self.device)
        self.steps = int(state["steps"])
        self.preds = [[p.to(self.device)] if p.numel() else [] for p in state["preds"]]
        self.targets = [[t.to(self.device)] if t.numel() else [] for t in state["targets"]]
