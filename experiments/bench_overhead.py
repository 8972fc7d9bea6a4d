"""Benchmark: ebmad's time per EBM training step against a bare PyTorch loop doing the same SGLD + CD step.

    python experiments/bench_overhead.py [--steps 60] [--warmup 10] [--threads 1] [--label before] [overrides ...]

Both sides run the demo model (``experiment=quickstart``: 32x32, base width 32, SGLD K=20, batch 32, Adam) on
the same number of threads, one after the other in this process:

- bare: ``EnergyNet`` + Adam; per step positives plus data noise, chains from uniform noise, K SGLD updates
  with the parameters frozen, CD loss, backward, optimizer step; the positives are one fixed in-memory batch
  (no data loader).
- ebmad: ``ebmad.train.run`` of the composed config (``experiment=quickstart`` plus the given overrides,
  the default callbacks and logger), ``trainer.max_steps=steps``; time from the start of step ``warmup`` to
  the end of the last step (data loading, callbacks, logging, checkpoints, epoch ends included), test set
  skipped.

Prints both times per step, their ratio and the device; appends a row to experiments/results/bench_overhead.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

import ebmad.train as train_mod
from ebmad.models.ebm.network import EnergyNet
from ebmad.models.ebm.sgld import frozen, sgld_sample, uniform_init
from ebmad.run.builders import compose_config
from ebmad.run.metadata import cpu_name, git_commit

ROOT = Path(__file__).resolve().parent.parent
CSV = ROOT / "experiments" / "results" / "bench_overhead.csv"
FIELDS = ("date", "label", "commit", "device", "threads", "load_1min", "steps", "image_size", "batch_size",
          "sgld_steps", "bare_ms_per_step", "ebmad_ms_per_step", "ratio", "overrides")  # fmt: skip


class StepClock(pl.Callback):
    """Wall time at the start of every training step and at the end of the last one."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args: object) -> None:
        self.end = time.perf_counter()


def ebmad_step_ms(cfg: DictConfig, warmup: int) -> float:
    """Milliseconds per step of ``ebmad.train.run(cfg)`` from step ``warmup`` to the end of training."""
    clock = StepClock()
    build = train_mod.build_callbacks
    train_mod.build_callbacks = lambda c: [*build(c), clock]
    try:
        train_mod.run(cfg)
    finally:
        train_mod.build_callbacks = build
    n = len(clock.starts) - warmup
    return 1000 * (clock.end - clock.starts[warmup]) / n


def bare_step_ms(cfg: DictConfig, steps: int, warmup: int) -> float:
    """Milliseconds per step of the same SGLD + CD step in a plain loop (median of the timed steps)."""
    m = cfg.model
    size, batch = int(cfg.data.image_size), int(cfg.data.batch_size)
    torch.manual_seed(0)
    net = EnergyNet(3, size, int(m.base_width))
    opt = torch.optim.Adam(net.parameters(), lr=float(m.lr), betas=tuple(m.betas))
    data = torch.rand(batch, 3, size, size) * 2 - 1
    rng = tuple(m.data_range)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(step)
        x_pos = data + float(m.data_noise) * torch.randn(data.shape, generator=gen)
        x0 = uniform_init(tuple(x_pos.shape), rng, "cpu", gen)
        with frozen(net):
            x_neg = sgld_sample(
                net, x0, int(m.sgld_steps), float(m.sgld_step_size), float(m.sgld_noise), rng, gen
            )
        loss = net(x_pos).mean() - net(x_neg).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss)  # the loss is read once per step (as a logger would)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[warmup:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps of each side")
    ap.add_argument("--warmup", type=int, default=10, help="first steps not timed")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or None,
                    help="torch threads of both sides (default: OMP_NUM_THREADS, else torch's default)")  # fmt: skip
    ap.add_argument("--label", default="", help="a word for the CSV row, e.g. before / after")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("overrides", nargs="*", help="train overrides after experiment=quickstart")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        overrides = ["experiment=quickstart", f"trainer.max_steps={a.steps}", "test=false",
                     f"paths.log_dir={tmp}", *a.overrides]  # fmt: skip
        cfg = compose_config(Path(tmp) / "run", overrides)
        bare = bare_step_ms(cfg, a.steps, a.warmup)
        ours = ebmad_step_ms(cfg, a.warmup)
    load = os.getloadavg()[0]
    device = f"cpu: {cpu_name()}, {os.cpu_count()} cores, {threads} threads"
    ratio = ours / bare
    print(f"device: {device}; load average {load:.2f}")
    print(f"bare PyTorch {bare:.1f} ms/step, ebmad {ours:.1f} ms/step: ratio {ratio:.2f}x "
          f"({a.steps} steps, first {a.warmup} not timed)")  # fmt: skip
    if not a.no_csv:
        new = not CSV.is_file()
        with CSV.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow({"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "label": a.label,
                        "commit": (git_commit().get("commit") or "")[:12], "device": device, "threads": threads,
                        "load_1min": f"{load:.2f}", "steps": a.steps, "image_size": cfg.data.image_size,
                        "batch_size": cfg.data.batch_size, "sgld_steps": cfg.model.sgld_steps,
                        "bare_ms_per_step": f"{bare:.1f}", "ebmad_ms_per_step": f"{ours:.1f}",
                        "ratio": f"{ratio:.3f}", "overrides": " ".join(a.overrides)})  # fmt: skip
        print(f"appended to {CSV}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
