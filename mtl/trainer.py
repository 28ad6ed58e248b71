"""The multi-task training loop.

`train(config, output_dir, callbacks=..., control=...)` runs one job: it builds the model, data,
strategies and optimizer from the config, resumes from the last complete checkpoint in
`output_dir` when there is one, trains, evaluates, checkpoints, and exports the model.

One optimizer step::

    pooled = encoder(batch)                    one forward through the shared encoder
    losses = {task: CE(head_task(pooled))}     tasks with labels in this batch only
    total, w = weighting.combine(losses)       sum / static / uncertainty / dwa / rlw / gradnorm
    backward:
      plain        total.backward()
      task grads   g_t = dL_t/d pooled (through the small heads only), then one encoder backward
                   with gradient.combine([w_t g_t]) (PCGrad/MGDA at representation level),
                   also used by GradNorm and by the sampled gradient-conflict cosine
      parameters   dL_t/d theta_encoder for every task (one encoder backward per task)

On several devices (`devices > 1`, under torchrun) each rank trains on its share of every
global batch (`_backward_shard`, see `mtl.distributed`); rank 0 alone reports, evaluates,
checkpoints and exports.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mtl import distributed
from mtl.callbacks import Callback, CallbackList, Outcome, TrainControl, TrainState
from mtl.checkpoint import Checkpointer, rng_state, set_rng_state
from mtl.config import TrainConfig
from mtl.errors import TrainingError
from mtl.export import export_model
from mtl.metrics import RunningStats, classification_report, mean_over_tasks
from mtl.mlm import MLMBatches, build_mlm_head, head_state, load_head_state, mlm_loss
from mtl.model import MultiTaskModel, build_model, default_device, resolve_model_path
from mtl.pipeline import Batch, Shard, TrainData, build_train_data
from mtl.strategies import GradientStrategy, WeightingStrategy, build_gradient, build_weighting
from mtl.summary import summarise

__all__ = ["TrainResult", "Trainer", "train"]

MAX_SKIPPED_IN_A_ROW = 10


@dataclass
class TrainResult:
    outcome: Outcome  # completed or stopped (a failed run raises)
    state: TrainState
    metrics: dict[str, Any] = field(default_factory=dict)  # {"validation": ..., "test": ...}
    model_dir: Path | None = None


def train(
    config: TrainConfig,
    output_dir: str | Path,
    *,
    callbacks: Sequence[Callback] = (),
    control: TrainControl | None = None,
    resolve: Callable[[str], Path] | None = None,
    resume: bool = True,
    max_batches: int | None = None,
) -> TrainResult:
    """Train `config` into `output_dir`. `max_batches` caps the run (CLI `--dry-run`)."""
    trainer = Trainer(config, output_dir, callbacks=callbacks, resolve=resolve)
    return trainer.fit(control=control, resume=resume, max_batches=max_batches)


def _lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    sched = config.scheduler
    warmup = sched.warmup_steps or int(sched.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if sched.name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if sched.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


class _EncoderAndHeads(nn.Module):
    """The encoder and every head in one forward, which is what DistributedDataParallel wraps
    (it hooks into `forward`); R-Drop's second head pass with `twice`."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, twice: bool
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor] | None]:
        pooled = self.model.encoder(input_ids, attention_mask)
        logits = self.model.forward_heads(pooled)
        second = self.model.forward_heads(pooled) if twice else None
        return pooled, logits, second


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | Path,
        *,
        callbacks: Sequence[Callback] = (),
        resolve: Callable[[str], Path] | None = None,
    ) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        # several devices: this process is one rank (None in a single process)
        self.dist = distributed.setup(config.devices, config.device)
        main = self.dist is None or self.dist.is_main
        # the callbacks report, so only rank 0 runs them; stop requests reach every rank
        self.callbacks = CallbackList(list(callbacks) if main else [])
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints")
        self.task_names = config.task_names

        self._seed_everything(config.seed)
        self.device = self.dist.device if self.dist is not None else default_device(config.device)
        use_bf16 = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda"
        )
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        )
        self.precision = "bf16" if use_bf16 else "fp32"

        needs_text = config.data.kind == "files"
        self.model, self.tokenizer = build_model(
            config.encoder, config.tasks, need_tokenizer=needs_text
        )
        self.model.to(self.device)
        self.data: TrainData = build_train_data(config, self.tokenizer, resolve)
        self.label_names = self.data.label_names
        self.weighting: WeightingStrategy = build_weighting(config.weighting, self.task_names)
        self.weighting.to(self.device)
        self.gradient: GradientStrategy = build_gradient(config.gradient, self.task_names)
        self.loss_fns = self._loss_functions()
        self.mlm_head: nn.Module | None = None
        self.mlm_batches: MLMBatches | None = None
        self._mlm_sums = [0.0, 0, 0, 0]  # loss sum, batches, correct tokens, masked tokens
        self._mlm_index = 0
        if config.mlm.enabled:
            self._setup_mlm(resolve)
        self.optimizer = self._optimizer()
        self.steps_per_epoch = self.data.steps_per_epoch(config.grad_accum_steps)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(config, self.total_steps)
        )
        self.stats = RunningStats(self.task_names, [t.n_classes for t in config.tasks], self.device)
        self.shared_params = [p for p in self.model.encoder.parameters() if p.requires_grad]
        self.head_clips = [
            (list(self.model.heads[t.name].parameters()), t.grad_clip)
            for t in config.tasks
            if t.grad_clip is not None
        ]
        self._pending_cosine: dict[str, float] | None = None
        self.average: AveragedModel | None = None
        averaging = config.averaging
        # Parameters only (`use_buffers=False`): the encoder's buffers are integer position and
        # token-type ids, which an EMA step would round (p * d + p * (1 - d) -> p - 1).
        if averaging.kind == "ema":
            self.average = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(averaging.ema_decay)
            )
        elif averaging.kind == "swa":
            self.average = AveragedModel(self.model)
        self.swa_first_step = math.ceil(averaging.swa_start * self.total_steps)
        self.ddp: DistributedDataParallel | None = None
        if self.dist is not None:
            # a head may get no loss in a step when labels can be missing (file data)
            self.ddp = distributed.wrap(
                _EncoderAndHeads(self.model),
                self.dist,
                find_unused_parameters=config.data.kind == "files",
            )

    # ------------------------------------------------------------------------------ set-up

    def _setup_mlm(self, resolve: Callable[[str], Path] | None) -> None:
        """The MLM head and its pool of texts: the training texts, plus `mlm.data`."""
        from mtl.data import encode_texts
        from mtl.datafiles import read_records

        mlm = self.config.mlm
        enc = self.config.encoder
        pool: list[list[int]] = [
            ids for source in self.data.train for ids in getattr(source, "input_ids", [])
        ]
        if mlm.data is not None:
            path = (resolve or Path)(mlm.data)
            records = read_records(path, text_column=mlm.text_column, name=mlm.data)
            texts = [str(r[mlm.text_column]) for r in records]
            pool += encode_texts(self.tokenizer, texts, enc.max_length)
        self.mlm_batches = MLMBatches(
            pool, self.tokenizer, batch_size=self.config.batch_size,
            probability=mlm.probability, seed=self.config.seed,
        )  # fmt: skip
        source = None if enc.random_init is not None else resolve_model_path(enc.model)
        self.mlm_head = build_mlm_head(self.model.encoder.transformer, source).to(self.device)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _loss_functions(self) -> dict[str, Callable[..., Tensor]]:
        fns: dict[str, Callable[..., Tensor]] = {}
        self.class_weights: dict[str, Tensor | None] = {}
        for task in self.config.tasks:
            weight = None
            if task.class_weights == "balanced":
                counts = self.data.class_counts(task.name, task.n_classes).double()
                # sklearn's "balanced": n_samples / (n_classes * count); unseen classes get 0.
                weight = counts.sum() / (task.n_classes * counts.clamp(min=1))
                weight = torch.where(counts > 0, weight, torch.zeros_like(weight)).float()
            elif isinstance(task.class_weights, list):
                weight = torch.tensor(task.class_weights, dtype=torch.float32)
            self.class_weights[task.name] = weight

            def fn(
                logits: Tensor,
                target: Tensor,
                w: Tensor | None = None if weight is None else weight.to(self.device),
                smoothing: float = task.label_smoothing,
            ) -> Tensor:
                return F.cross_entropy(
                    logits.float(), target, weight=w, label_smoothing=smoothing, ignore_index=-100
                )

            fns[task.name] = fn
        return fns

    def _optimizer(self) -> torch.optim.Optimizer:
        opt = self.config.optimizer
        encoder_lr = opt.encoder_lr or opt.lr
        decay_ok = opt.name != "adam"  # Adam's L2 penalty is rarely wanted; AdamW/SGD decay
        groups: list[dict[str, Any]] = []

        def add(params: list[nn.Parameter], lr: float, name: str) -> None:
            params = [p for p in params if p.requires_grad]
            matrices = [p for p in params if p.ndim >= 2]
            vectors = [p for p in params if p.ndim < 2]  # biases, LayerNorm: no decay
            if matrices:
                wd = opt.weight_decay if decay_ok else 0.0
                groups.append({"params": matrices, "lr": lr, "weight_decay": wd, "name": name})
            if vectors:
                groups.append({"params": vectors, "lr": lr, "weight_decay": 0.0, "name": name})

        encoder_params = list(self.model.encoder.parameters())
        if opt.layer_decay < 1.0:
            depths = self.model.encoder.layer_depths()
            for depth in sorted({depths.get(id(p), 0) for p in encoder_params}):
                add(
                    [p for p in encoder_params if depths.get(id(p), 0) == depth],
                    encoder_lr * opt.layer_decay**depth,
                    "encoder" if depth == 0 else f"encoder-{depth}",
                )
        else:
            add(encoder_params, encoder_lr, "encoder")
        if self.mlm_head is not None:
            shared = {id(p) for p in encoder_params}  # the tied output matrix is the encoder's
            add([p for p in self.mlm_head.parameters() if id(p) not in shared], encoder_lr, "mlm")
        for task in self.config.tasks:
            add(list(self.model.heads[task.name].parameters()), task.lr or opt.lr, task.name)
        extra = self.weighting.extra_parameters()
        if extra:
            lr = getattr(self.config.weighting, "lr", None) or opt.lr
            groups.append({"params": extra, "lr": lr, "weight_decay": 0.0, "name": "weighting"})
        # The fused (CUDA and CPU) or foreach implementations: the default per-tensor loop
        # costs several percent of a step.
        impl = {"fused": True} if self._fused_ok() else {"foreach": True}
        if opt.name == "sgd":
            return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, **impl)
        cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, **impl)

    def _fused_ok(self) -> bool:
        return self.device.type in ("cuda", "cpu")

    # ------------------------------------------------------------------------------ loop

    def fit(
        self,
        control: TrainControl | None = None,
        resume: bool = True,
        max_batches: int | None = None,
    ) -> TrainResult:
        control = control or TrainControl()
        state = TrainState(total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch)
        if resume and (path := self.checkpointer.latest()) is not None:
            state = self._restore(path)
            state.total_steps = self.total_steps
            state.steps_per_epoch = self.steps_per_epoch
        self.state = state
        self.callbacks.on_train_begin(state, control)
        outcome = Outcome.FAILED
        metrics: dict[str, Any] = {}
        model_dir = None
        try:
            outcome = self._loop(state, control, max_batches)
            main = self.dist is None or self.dist.is_main  # rank 0 alone exports
            if outcome is Outcome.COMPLETED and max_batches is None and main:
                if self._may_save(state, control):
                    metrics, model_dir = self._finish(state, control)
                else:
                    outcome = Outcome.STOPPED
                    state.stop_reason = control.stop_reason
        except BaseException:
            outcome = Outcome.FAILED
            raise
        finally:
            self.callbacks.on_train_end(state, outcome, control)
            distributed.teardown(self.dist)
        return TrainResult(outcome=outcome, state=state, metrics=metrics, model_dir=model_dir)

    def _loop(self, state: TrainState, control: TrainControl, max_batches: int | None) -> Outcome:
        cfg = self.config
        accum = cfg.grad_accum_steps
        started = time.perf_counter() - state.elapsed
        batches_run = 0
        self.model.train()
        while state.step < self.total_steps:
            plan = self.data.epoch_plan(state.epoch)
            group: list[Batch | Shard] = []
            for index in range(state.batch_in_epoch, len(plan)):
                if self.dist is None:
                    group.append(plan[index])
                else:
                    group.append(plan.shard(index, self.dist.rank, self.dist.world))
                last_of_epoch = index == len(plan) - 1
                if len(group) < accum and not last_of_epoch:
                    continue
                self._optimizer_step(group, state)
                batches_run += len(group)
                state.batch_in_epoch = index + 1
                group = []
                state.step += 1
                state.elapsed = time.perf_counter() - started
                if state.step % cfg.log_every == 0 or state.step == self.total_steps:
                    self._log(state, control)
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    self._evaluate_and_checkpoint(state, control)
                elif (
                    cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
                ) or control.should_checkpoint:
                    self._checkpoint(state, control, is_best=False)
                control.should_checkpoint = False
                self.callbacks.on_step_end(state, control)
                self._sync_stop(control)
                if control.should_stop and control.should_checkpoint:
                    self._checkpoint(state, control, is_best=False)  # e.g. save, then cancel
                    control.should_checkpoint = False
                if max_batches is not None and batches_run >= max_batches:
                    return Outcome.COMPLETED
                if control.should_stop:
                    return self._stop_outcome(state, control)
                if state.step >= self.total_steps:
                    break
            # End of the epoch (or of the run, when max_steps falls mid-epoch).
            if state.batch_in_epoch >= len(plan):
                self.weighting.end_epoch()
                state.epoch += 1
                state.batch_in_epoch = 0
                if not cfg.eval_every:
                    self._evaluate_and_checkpoint(state, control)
                    self._sync_stop(control)
                if control.should_stop:  # early stopping decided at this evaluation
                    return self._stop_outcome(state, control)
        if state.batch_in_epoch != 0 and not cfg.eval_every:
            self._evaluate_and_checkpoint(state, control)  # max_steps ended mid-epoch
            self._sync_stop(control)
            if control.should_stop:
                return self._stop_outcome(state, control)
        return Outcome.COMPLETED

    def _sync_stop(self, control: TrainControl) -> None:
        """Several devices: a stop requested on any rank (rank 0's callbacks, early stopping,
        a signal) stops every rank here, at the same step."""
        if self.dist is not None:
            distributed.sync_stop(control, self.device)

    @staticmethod
    def _stop_outcome(state: TrainState, control: TrainControl) -> Outcome:
        """Early stopping completes the run (the best model is exported); any other stop
        request (cancel, Ctrl-C) leaves it `stopped` with its last checkpoint."""
        state.stop_reason = control.stop_reason
        early = (control.stop_reason or "").startswith("early stopping")
        return Outcome.COMPLETED if early else Outcome.STOPPED

    def _optimizer_step(self, group: list[Batch | Shard], state: TrainState) -> None:
        cfg = self.config
        sample_cosine = (
            cfg.grad_conflict_every > 0 and (state.step + 1) % cfg.grad_conflict_every == 0
        )
        all_finite = True
        # MLM batch i is the same on every run: its index follows the optimizer step
        self._mlm_index = state.step * cfg.grad_accum_steps
        if self.dist is not None:
            distributed.reseed(cfg.seed, self.dist.rank, state.step)
        for i, batch in enumerate(group):
            if isinstance(batch, Shard):
                last = i == len(group) - 1  # gradients are all-reduced with the last only
                finite = self._backward_shard(batch, len(group), sample_cosine, sync=last)
            else:
                finite = self._backward(batch, len(group), sample_cosine)
            all_finite = all_finite and finite
        if not all_finite:
            self.optimizer.zero_grad(set_to_none=True)
            state.skipped_steps += 1
            state.skipped_total += 1
            if cfg.nonfinite_loss == "stop" or state.skipped_steps > MAX_SKIPPED_IN_A_ROW:
                raise TrainingError(
                    f"the training loss became non-finite (NaN or inf) at step {state.step + 1}"
                    + ("" if cfg.nonfinite_loss == "stop" else f" {state.skipped_steps} times")
                )
            return
        state.skipped_steps = 0
        if self.dist is not None:
            distributed.average_grads(self.weighting.extra_parameters())
        for params, max_norm in self.head_clips:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]],
                cfg.grad_clip,
                foreach=True,
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_average(state.step + 1)

    def _update_average(self, step: int) -> None:
        """EMA after every step; SWA every `swa_every` steps from `swa_start` on."""
        if self.average is None:
            return
        averaging = self.config.averaging
        if averaging.kind == "swa" and (
            step < self.swa_first_step or (step - self.swa_first_step) % averaging.swa_every
        ):
            return
        self.average.update_parameters(self.model)

    def scored_model(self) -> MultiTaskModel:
        """The model evaluated and exported: the weight average once it holds one."""
        if self.average is not None and int(self.average.n_averaged) > 0:
            module = self.average.module
            assert isinstance(module, MultiTaskModel)
            return module
        return self.model

    def _backward(self, batch: Batch, accum: int, sample_cosine: bool) -> bool:
        """Forward and backward one micro-batch; False when its loss is not finite."""
        ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        labels = {t: y.to(self.device, non_blocking=True) for t, y in batch.labels.items()}
        present = batch.present  # tasks with at least one label here (known on the host)
        level = self.config.gradient.level
        surgery = self.config.gradient.name != "none"
        want_task_grads = surgery or self.weighting.needs_task_grads or sample_cosine
        param_level = surgery and level == "parameters" and bool(self.shared_params)

        rdrop = self.config.rdrop.alpha
        with self.autocast:
            pooled = self.model.encoder(ids, mask)
            detached = None
            if want_task_grads and not param_level:
                detached = pooled.detach().requires_grad_(True)
                head_input = detached
            else:
                head_input = pooled
            logits = self.model.forward_heads(head_input)
            second = self.model.forward_heads(head_input) if rdrop > 0 else None
        if second is None:
            losses = {t: self.loss_fns[t](logits[t], labels[t]) for t in present}
        else:
            losses = {}
            for t in present:
                fn = self.loss_fns[t]
                ce = 0.5 * (fn(logits[t], labels[t]) + fn(second[t], labels[t]))
                losses[t] = ce + rdrop / 4 * _symmetric_kl(logits[t], second[t])
        total, weights = self.weighting.combine(losses)
        if not bool(torch.isfinite(total)):
            return False
        if self.mlm_batches is not None and not self._mlm_backward(accum):
            return False

        for i, name in enumerate(self.task_names):
            if name in losses:
                self.stats.add(i, losses[name], logits[name].detach().argmax(-1), labels[name])
        self.stats.add_total(total)
        self.weighting.observe({t: loss.detach() for t, loss in losses.items()})

        if not want_task_grads:
            (total / accum).backward()
            return True
        if param_level:
            self._backward_parameters(pooled, losses, weights, total, accum, sample_cosine)
            return True
        assert detached is not None
        task_grads = {
            t: torch.autograd.grad(losses[t], detached, retain_graph=True)[0] for t in present
        }
        if self.weighting.needs_task_grads:
            flat = {t: g.flatten().float() for t, g in task_grads.items()}
            self.weighting.update_from_grads({t: v.detach() for t, v in losses.items()}, flat)
        if sample_cosine:
            self._pending_cosine = _cosines({t: g.flatten() for t, g in task_grads.items()})
        (total / accum).backward()  # heads and strategy parameters; stops at `detached`
        if surgery:
            stacked = torch.stack(
                [weights[t].detach() * task_grads[t].flatten() for t in present]
            ).float()
            rep_grad = self.gradient.combine(stacked).view_as(pooled).to(pooled.dtype) / accum
        else:
            rep_grad = detached.grad  # of `total / accum`: already divided
        if pooled.requires_grad:
            pooled.backward(rep_grad)
        return True

    def _backward_shard(self, shard: Shard, accum: int, sample_cosine: bool, *, sync: bool) -> bool:
        """Several devices: forward and backward this rank's share of one global batch.

        Each task's loss is this rank's summed loss over the global batch's denominator (its
        labelled rows, or their class weights), times the number of ranks: the gradients
        DistributedDataParallel averages (with the last micro-batch of a step, `sync`) are
        then those of the whole global batch for the weightings allowed here (linear in the
        task losses). One all-gather brings every rank's losses and predictions: the global
        finite check, the reported statistics and DWA's observed losses are the global ones.
        False when the global loss is not finite (every rank then skips the micro-batch)."""
        assert self.dist is not None and self.ddp is not None
        world = self.dist.world
        batch = shard.batch
        ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        labels = {t: y.to(self.device, non_blocking=True) for t, y in batch.labels.items()}
        present = shard.present
        rdrop = self.config.rdrop.alpha
        with nullcontext() if sync else self.ddp.no_sync():
            with self.autocast:
                pooled, logits, second = self.ddp(ids, mask, rdrop > 0)
            losses: dict[str, Tensor] = {}
            for t in present:
                scale = world / self._denominator(t, shard.labels[t])
                ce = self._ce_sum(t, logits[t], labels[t])
                if second is None:
                    losses[t] = ce * scale
                    continue
                ce = 0.5 * (ce + self._ce_sum(t, second[t], labels[t]))
                kl_scale = rdrop / 4 * world * shard.local_rows / shard.rows
                losses[t] = ce * scale + kl_scale * _symmetric_kl(logits[t], second[t])
            total, _ = self.weighting.combine(losses)

            # [non-finite, total, losses..., then per task: predictions, targets (padded)]
            width = distributed.shard_width(shard.rows, world)
            head = [(~torch.isfinite(total.detach())).double(), total.detach().double()]
            head += [losses[t].detach().double() for t in present]
            rows: list[Tensor] = []
            for t in present:
                pad = width - labels[t].numel()
                rows.append(F.pad(logits[t].detach().argmax(-1), (0, pad), value=-100))
                rows.append(F.pad(labels[t], (0, pad), value=-100))
            vector = torch.cat([torch.stack(head), *[r.double() for r in rows]])
            gathered = distributed.gather_rows(vector)
            if float(gathered[:, 0].sum()) > 0:
                return False
            means = gathered[:, 1 : 2 + len(present)].sum(dim=0) / world
            offset = 2 + len(present)
            for k, t in enumerate(present):
                at = offset + 2 * k * width
                preds = gathered[:, at : at + width].reshape(-1).long()
                target = gathered[:, at + width : at + 2 * width].reshape(-1).long()
                self.stats.add(self.task_names.index(t), means[1 + k], preds, target)
            self.stats.add_total(means[0])
            self.weighting.observe({t: means[1 + k] for k, t in enumerate(present)})

            if sample_cosine:
                grads = {
                    t: torch.autograd.grad(losses[t], pooled, retain_graph=True)[0] for t in present
                }
                self._pending_cosine = distributed.all_reduce_cosines(grads)
            (total / accum).backward()
        return True

    def _ce_sum(self, task: str, logits: Tensor, target: Tensor) -> Tensor:
        """The task's cross-entropy summed over its labelled rows (what `loss_fns` averages)."""
        weight = self.class_weights[task]
        return F.cross_entropy(
            logits.float(),
            target,
            weight=None if weight is None else weight.to(self.device),
            label_smoothing=self.config.tasks[self.task_names.index(task)].label_smoothing,
            ignore_index=-100,
            reduction="sum",
        )

    def _denominator(self, task: str, labels: Tensor) -> float:
        """What the task's mean loss on a batch with `labels` divides by: its labelled rows, or
        the sum of their class weights."""
        valid = labels[labels != -100]
        weight = self.class_weights[task]
        return float(valid.numel()) if weight is None else float(weight[valid].double().sum())

    def _mlm_backward(self, accum: int) -> bool:
        """One masked batch through the encoder and the MLM head, `weight * loss` backward
        (its own graph: the encoder's gradients add up). False when the loss is not finite."""
        assert self.mlm_batches is not None and self.mlm_head is not None
        index = self._mlm_index
        self._mlm_index += 1
        ids, mask, labels = (t.to(self.device) for t in self.mlm_batches.batch(index))
        with self.autocast:
            out = mlm_loss(self.model.encoder.transformer, self.mlm_head, ids, mask, labels)
        if out is None:
            return True
        loss, correct, count = out
        if not bool(torch.isfinite(loss)):
            return False
        (self.config.mlm.weight * loss / accum).backward()
        sums = self._mlm_sums
        sums[0] += float(loss.detach())
        sums[1] += 1
        sums[2] += correct
        sums[3] += count
        return True

    def _backward_parameters(
        self,
        pooled: Tensor,
        losses: dict[str, Tensor],
        weights: dict[str, Tensor],
        total: Tensor,
        accum: int,
        sample_cosine: bool,
    ) -> None:
        shared = self.shared_params
        flat: dict[str, Tensor] = {}
        for t, loss in losses.items():
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            flat[t] = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, shared, strict=True)
                ]
            )
        if self.weighting.needs_task_grads:
            self.weighting.update_from_grads({t: v.detach() for t, v in losses.items()}, flat)
        if sample_cosine:
            self._pending_cosine = _cosines(flat)
        head_params = [p for p in self.model.heads.parameters() if p.requires_grad]
        head_params += self.weighting.extra_parameters()
        (total / accum).backward(inputs=head_params)
        stacked = torch.stack([weights[t].detach().float() * g.float() for t, g in flat.items()])
        combined = self.gradient.combine(stacked) / accum
        offset = 0
        for p in shared:
            n = p.numel()
            g = combined[offset : offset + n].view_as(p).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
            offset += n

    # ---------------------------------------------------------------------- reporting

    def _log(self, state: TrainState, control: TrainControl) -> None:
        metrics = self.stats.flush()
        metrics["weights"] = self.weighting.current_weights()
        metrics["lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["skipped_steps"] = state.skipped_total
        loss_sum, batches, correct, count = self._mlm_sums
        if batches:
            metrics["mlm"] = {"loss": loss_sum / batches, "accuracy": correct / max(count, 1)}
            self._mlm_sums = [0.0, 0, 0, 0]
        if self._pending_cosine is not None:
            metrics["grad_cosine"] = self._pending_cosine
            self._pending_cosine = None
        self.callbacks.on_log(state, metrics, control)

    @torch.no_grad()
    def evaluate(self, split: str = "validation") -> dict[str, Any] | None:
        plan = self.data.eval_plan(split)
        if plan is None:
            return None
        model = self.scored_model()
        was_training = model.training
        model.eval()
        preds: dict[str, list[Tensor]] = {t: [] for t in self.task_names}
        targets: dict[str, list[Tensor]] = {t: [] for t in self.task_names}
        loss_sums = dict.fromkeys(self.task_names, 0.0)
        for batch in plan:
            ids = batch.input_ids.to(self.device)
            mask = batch.attention_mask.to(self.device)
            with self.autocast:
                logits = model(ids, mask)
            for t in batch.present:
                y = batch.labels[t].to(self.device)
                valid = y != -100
                lg = logits[t].float()[valid]
                yv = y[valid]
                loss_sums[t] += float(F.cross_entropy(lg, yv, reduction="sum"))
                preds[t].append(lg.argmax(-1).cpu())
                targets[t].append(yv.cpu())
        if was_training:
            model.train()
        reports = {}
        for t in self.task_names:
            p = torch.cat(preds[t]) if preds[t] else torch.zeros(0, dtype=torch.long)
            y = torch.cat(targets[t]) if targets[t] else torch.zeros(0, dtype=torch.long)
            loss = loss_sums[t] / max(int(y.numel()), 1)
            reports[t] = classification_report(p, y, self.label_names[t], loss)
        return {"split": split, "tasks": reports, "mean": mean_over_tasks(reports)}

    def _monitored(self, metrics: dict[str, Any]) -> float:
        scope, _, name = self.config.monitor.partition("/")
        block = metrics["mean"] if scope == "mean" else metrics["tasks"][scope]
        return float(block[name])

    def _evaluate_and_checkpoint(self, state: TrainState, control: TrainControl) -> None:
        if self.dist is not None and not self.dist.is_main:
            return  # rank 0 evaluates; the others wait at the next stop-flag all-reduce
        metrics = self.evaluate("validation")
        is_best = False
        if metrics is not None:
            value = self._monitored(metrics)
            better = state.best_metric is None or (
                value > state.best_metric + self._min_delta()
                if self.config.monitor_mode == "max"
                else value < state.best_metric - self._min_delta()
            )
            if better:
                state.best_metric, state.best_step = value, state.step
                state.evals_without_improvement = 0
                is_best = True
            else:
                state.evals_without_improvement += 1
            metrics["monitor"] = {"name": self.config.monitor, "value": value, "best": is_best}
            self.callbacks.on_evaluate(state, metrics, control)
            es = self.config.early_stopping
            if es is not None and state.evals_without_improvement >= es.patience:
                control.stop(
                    f"early stopping: {self.config.monitor} did not improve for "
                    f"{es.patience} evaluations (best {state.best_metric:.4f} at step "
                    f"{state.best_step})"
                )
        self._checkpoint(state, control, is_best=is_best)

    def _min_delta(self) -> float:
        es = self.config.early_stopping
        return es.min_delta if es is not None else 0.0

    def _may_save(self, state: TrainState, control: TrainControl) -> bool:
        """Ask the callbacks (`on_save`) whether this run may still write; if not, stop it."""
        self.callbacks.on_save(state, control)
        if not control.allow_save:
            control.stop(control.stop_reason or "a callback refused the write")
        return control.allow_save

    def _checkpoint(self, state: TrainState, control: TrainControl, *, is_best: bool) -> None:
        if self.dist is not None and not self.dist.is_main:
            return  # every rank holds the same weights and state: rank 0 writes them
        if not self._may_save(state, control):
            return
        path = self.checkpointer.save(
            state=state,
            model=self.model,
            strategy=self.weighting,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra={
                "rng": rng_state(),
                "stats": self.stats.state_dict(),
                "pending_cosine": self._pending_cosine,
            },
            config_json=self.config.model_dump_json(indent=1),
            is_best=is_best,
            tensors=self._extra_tensors(),
        )
        self.callbacks.on_checkpoint(state, path, control)

    def _extra_tensors(self) -> dict[str, dict[str, Tensor]]:
        """What a checkpoint keeps besides the model: the weight average, the MLM head."""
        out: dict[str, dict[str, Tensor]] = {}
        if self.average is not None:
            out["average"] = self.average.state_dict()
        if self.mlm_head is not None:
            out["mlm_head"] = head_state(self.mlm_head)
        return out

    def _load_extra_tensors(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        if self.average is not None:
            if "average" not in tensors:
                raise TrainingError("the checkpoint has no weight average (averaging changed?)")
            self.average.load_state_dict(tensors["average"])
        if self.mlm_head is not None:
            if "mlm_head" not in tensors:
                raise TrainingError("the checkpoint has no MLM head (mlm changed?)")
            load_head_state(self.mlm_head, tensors["mlm_head"])

    def _restore(self, path: Path) -> TrainState:
        try:
            written_on = int(json.loads((path / "config.json").read_text()).get("devices", 1))
        except (OSError, ValueError, TypeError, AttributeError):
            written_on = 1
        if written_on != self.config.devices:
            raise TrainingError(
                f"the checkpoint {path.name} was written by a run on {written_on} device(s); "
                f"resume it with devices: {written_on} (its position in the epoch counts "
                f"batches of batch_size x devices)"
            )
        loaded = self.checkpointer.load(
            path, model=self.model, strategy=self.weighting, map_location=self.device
        )
        self._load_extra_tensors(loaded.tensors)
        self.optimizer.load_state_dict(loaded.optimizer)
        self.scheduler.load_state_dict(loaded.scheduler)
        set_rng_state(loaded.extra["rng"])
        self.stats.load_state_dict(loaded.extra["stats"])
        self._pending_cosine = loaded.extra.get("pending_cosine")
        return loaded.state

    def _finish(self, state: TrainState, control: TrainControl) -> tuple[dict[str, Any], Path]:
        """Export the best model (the last when nothing was monitored), score it on test."""
        best = self.checkpointer.best()
        if best is not None and state.best_step != state.step:
            Checkpointer.load_weights(best, self.model, self.device)
            self._load_extra_tensors(Checkpointer.load_tensors(best, self.device))
        metrics: dict[str, Any] = {"validation": None, "test": None}
        if best is not None:
            metrics["validation"] = self.evaluate("validation")
        test = self.evaluate("test")
        if test is not None:
            metrics["test"] = test
            self.callbacks.on_evaluate(state, test, control)
        extra: dict[str, Any] = {
            "metrics": {k: _scores(v) for k, v in metrics.items() if v is not None}
        }
        if self.average is not None:
            extra["averaging"] = {
                "kind": self.config.averaging.kind,
                "n_averaged": int(self.average.n_averaged),
            }
        model_dir = export_model(
            self.output_dir / "model",
            self.scored_model(),
            self.tokenizer,
            self.config,
            self.label_names,
            extra=extra,
            mlm_head=self.mlm_head if self.config.mlm.export else None,
        )
        (self.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics, model_dir


def _scores(report: dict[str, Any]) -> dict[str, Any]:
    """The summary `mtl.json` keeps of a report: task -> its numbers."""
    return {task: scores.scores() for task, scores in summarise(report).tasks.items()}


def _symmetric_kl(a: Tensor, b: Tensor) -> Tensor:
    """KL(p_a || p_b) + KL(p_b || p_a), averaged over the rows (R-Drop's consistency term)."""
    la, lb = F.log_softmax(a.float(), dim=-1), F.log_softmax(b.float(), dim=-1)
    return F.kl_div(lb, la, log_target=True, reduction="batchmean") + F.kl_div(
        la, lb, log_target=True, reduction="batchmean"
    )


def _cosines(grads: dict[str, Tensor]) -> dict[str, float]:
    names = list(grads)
    out = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = grads[names[i]].float(), grads[names[j]].float()
            out[f"{names[i]}|{names[j]}"] = float(F.cosine_similarity(a, b, dim=0, eps=1e-12))
    return out


def build_for_inference(config: TrainConfig) -> MultiTaskModel:
    model, _ = build_model(config.encoder, config.tasks, need_tokenizer=False)
    return model
