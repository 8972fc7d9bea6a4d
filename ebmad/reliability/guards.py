"""Non-finite detection: stop a diverging run before it writes broken weights, and name what broke.

One mechanism for training and testing:

- :class:`NonFiniteGuard` (a Lightning callback) checks, every ``check_every`` optimizer steps, the
  loss, the parameter gradients and whatever tensors the module handed over with
  :func:`report_values` in ``training_step`` (the EBM: ``energy_pos``, ``energy_neg``, ``sgld_samples``).
  The checks are device-side reductions; the host reads one small flag vector per check. With
  ``check_every=1`` (default) it raises before the optimizer step, so the weights stay those of the
  previous step. With ``check_every=N`` the flags accumulate on the device and are read every N steps
  and before every checkpoint write, which also verifies that the parameters are finite: a checkpoint
  of broken weights is never written. Checkpoints already on disk stay.
- :func:`check_finite_scores` / :func:`check_finite_values` after training (statistics, thresholds,
  validation and test scores): a :class:`NonFiniteError` naming the quantity instead of a crash (or a
  silently wrong AUROC) inside metric code. The run turns it into :class:`ScoresDiverged` with the step and
  the same hint as the training guard (:func:`diverged_after_training`): ``status: diverged``.

On a non-finite value the guard calls :meth:`NonFiniteGuard.on_non_finite`, which raises
:class:`TrainingDiverged`. A recovery policy that skips the step (``ebmad.reliability.spikes.SpikeGuard`` with ``skip``
or ``restore``, listed before this guard) marks the step as recovered; its values are then not held
against the run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch

DEFAULT_HINT = "lower model.lr / model.sgld_step_size, or enable model.alpha (energy regularization)"
_VALUES = "_ebmad_guard_values"  # module attribute: {name: tensor} reported in the current step
_ACTIVE = "_ebmad_guard_active"
LOSS, GRADIENT = "loss", "gradient"
RECOVERED = "_ebmad_recovered_step"  # module attribute: the step a recovery policy skipped (not applied)


class NonFiniteError(RuntimeError):
    """NaN or infinite values where finite ones are required; ``quantity`` names them."""

    def __init__(self, message: str, quantity: str = "a score") -> None:
        super().__init__(message)
        self.quantity = quantity


class TrainingDiverged(NonFiniteError):
    """Training produced NaN/inf (loss, gradients, energies, samples or weights)."""


class ScoresDiverged(TrainingDiverged):
    """The trained model gives NaN/inf after training (statistics, thresholds, validation or test scores)."""


def divergence_hint(module: Any, hint: str | None = None) -> str:
    """What to try: ``hint``, else the module's ``DIVERGENCE_HINT``, else the EBM's."""
    return hint or getattr(module, "DIVERGENCE_HINT", None) or DEFAULT_HINT


def diverged_after_training(exc: NonFiniteError, step: int, module: Any) -> ScoresDiverged:
    """The run-ending error for a non-finite value found after training: step, quantity and hint."""
    return ScoresDiverged(
        f"model diverged: {exc.quantity} is not finite after training at step {step} ({exc}). Checkpoints "
        f"already written stay loadable; {divergence_hint(module)}",
        quantity=exc.quantity,
    )


@dataclass
class NonFiniteReport:
    """What the guard found: the quantity, the step it first appeared at, and details when known."""

    quantity: str
    step: int
    detected_at: int
    detail: str = ""

    def message(self, hint: str) -> str:
        when = f"step {self.step}" + (
            f" (detected at step {self.detected_at})" if self.detected_at != self.step else ""
        )
        detail = f" ({self.detail})" if self.detail else ""
        return (
            f"training diverged at {when}: {self.quantity} is not finite{detail}. Checkpoints already "
            f"written hold earlier, finite weights; {hint}"
        )


def report_values(module: torch.nn.Module, **tensors: torch.Tensor) -> None:
    """Hand this training step's tensors (e.g. ``energy_pos=e_pos, sgld_samples=x_neg``) to the guard.

    A no-op unless a :class:`NonFiniteGuard` is active; stores detached references, nothing is copied
    or synchronized.
    """
    if not getattr(module, _ACTIVE, False):
        return
    store = getattr(module, _VALUES)
    for name, t in tensors.items():
        store[name] = t.detach()


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t).all()


def _counts(t: torch.Tensor) -> str:
    t = t.detach()
    n_nan, n_inf = torch.stack([torch.isnan(t).sum(), torch.isinf(t).sum()]).tolist()
    return f"{n_nan} NaN and {n_inf} inf of {t.numel()} values"


def _grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms in one fused call: non-finite iff an entry is (or the norm overflows, > 3e38)."""
    if hasattr(torch, "_foreach_norm"):
        return torch.stack(torch._foreach_norm(grads))
    return torch.stack([g.norm() for g in grads])


class NonFiniteGuard(pl.Callback):
    """Raise :class:`TrainingDiverged` naming the step and quantity when training produces NaN/inf.

    Args:
        check_every: read the device-side flags every N optimizer steps (and before each checkpoint).
            1 raises before the broken step is applied; N > 1 saves N-1 host syncs in N steps.
        check_gradients: also check parameter gradients (skipped under fp16 mixed precision, whose
            GradScaler handles inf gradients itself).
        hint: what to try, appended to the message; default: the module's ``DIVERGENCE_HINT``
            attribute if it has one, else the EBM's.
    """

    def __init__(self, check_every: int = 1, check_gradients: bool = True, hint: str | None = None) -> None:
        if check_every < 1:
            raise ValueError(f"callbacks.nonfinite.check_every must be >= 1, got {check_every}")
        self.check_every = check_every
        self.check_gradients = check_gradients
        self.hint = hint
        self._reset()

    def _reset(self) -> None:
        # this step: name -> finite flag (0-dim bool, on the device)
        self._pending: dict[str, torch.Tensor] = {}
        self._names: list[str] = []  # every quantity seen, in the order of the computation
        self._first_bad: torch.Tensor | None = None  # per quantity: first step it was non-finite, -1: never
        self._values: dict[str, torch.Tensor] = {}  # the last step's tensors, for the message
        self._loss: torch.Tensor | None = None
        self._step = 0

    # ----------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        setattr(pl_module, _ACTIVE, True)
        setattr(pl_module, _VALUES, {})
        self._reset()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        setattr(pl_module, _ACTIVE, False)
        setattr(pl_module, _VALUES, {})

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        values: dict[str, torch.Tensor] = getattr(pl_module, _VALUES, {})
        for name, t in values.items():
            self._flag(name, _all_finite(t))
        self._flag(LOSS, _all_finite(loss.detach()))
        self._values, self._loss = dict(values), loss.detach()
        values.clear()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if getattr(pl_module, RECOVERED, None) == trainer.global_step:
            self._pending = {}  # a recovery policy (ebmad.reliability.spikes.SpikeGuard) already undid this step
            return
        if self.check_gradients and getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                self._flag(GRADIENT, _all_finite(_grad_norms(grads)))
        self._accumulate(trainer.global_step)
        if (trainer.global_step + 1) % self.check_every == 0:
            self._sync(trainer, pl_module, with_detail=self.check_every == 1)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:  # fmt: skip
        self._sync(trainer, pl_module, with_detail=False)
        if not finite_parameters(pl_module.parameters()):
            bad = [n for n, p in pl_module.named_parameters() if not bool(_all_finite(p.detach()))]
            detail = f"{len(bad)} non-finite parameter tensors: {', '.join(bad[:5])}"
            report = NonFiniteReport("the weights", self._step, trainer.global_step, detail)
            self.on_non_finite(trainer, pl_module, report)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer, pl_module, with_detail=False)

    # ----------------------------------------------------------------------- policy
    def on_non_finite(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: NonFiniteReport
    ) -> None:
        """What to do about a non-finite value: raise :class:`TrainingDiverged` (override for a recovery)."""
        raise TrainingDiverged(
            report.message(divergence_hint(pl_module, self.hint)), quantity=report.quantity
        )

    # ----------------------------------------------------------------------- internals
    def _flag(self, name: str, finite: torch.Tensor) -> None:
        prev = self._pending.get(name)
        self._pending[name] = finite if prev is None else prev & finite

    def _accumulate(self, step: int) -> None:
        """Fold this step's flags into the per-quantity first-bad-step vector, on the device (no sync)."""
        self._step = step
        if not self._pending:
            return
        device = next(iter(self._pending.values())).device
        new = [n for n in self._pending if n not in self._names]
        if new or self._first_bad is None:
            more = torch.full((len(new),), -1, dtype=torch.long, device=device)
            self._first_bad = more if self._first_bad is None else torch.cat([self._first_bad, more])
            self._names += new
        true = torch.ones((), dtype=torch.bool, device=device)
        finite = torch.stack([self._pending.get(n, true) for n in self._names])
        self._first_bad.masked_fill_(~finite & (self._first_bad < 0), step)
        self._pending = {}

    def _sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule, with_detail: bool) -> None:
        """Read the flags (one small transfer); in DDP a problem on any rank stops every rank."""
        firsts = []
        if self._first_bad is not None:
            firsts = [(s, i, n) for i, (n, s) in enumerate(zip(self._names, self._first_bad.tolist(), strict=True))
                      if s >= 0]  # fmt: skip
        bad = bool(firsts)
        if trainer.world_size > 1:
            bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            return
        if firsts:  # earliest step; at a tie the first in the computation (samples, energies, loss, gradient)
            step, _, name = min(firsts)
            report = NonFiniteReport(
                name, step, trainer.global_step, self._detail(pl_module, name) if with_detail else ""
            )
        else:
            report = NonFiniteReport("a quantity on another process", self._step, trainer.global_step)
        self._first_bad, self._names = None, []
        self.on_non_finite(trainer, pl_module, report)

    def _detail(self, pl_module: pl.LightningModule, name: str) -> str:
        """Counts for the quantity (computed only when something is wrong)."""
        if name == LOSS and self._loss is not None:
            return f"loss = {self._loss.float().mean().item()}"
        if name in self._values:
            return _counts(self._values[name])
        if name == GRADIENT:
            bad = [
                n
                for n, p in pl_module.named_parameters()
                if p.grad is not None and not bool(_all_finite(p.grad))
            ]
            return (
                f"in {len(bad)} parameter tensors: {', '.join(bad[:5])}" if bad else "gradient norm overflow"
            )
        return ""


def check_finite_scores(scores: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`NonFiniteError` naming each score (image scores, pixel maps) that holds NaN/inf.

    One host sync for all scores; ``where`` says which batch or set (e.g. ``"test batch 3"``).
    """
    names = [k for k, v in scores.items() if v.is_floating_point()]
    if not names:
        return
    device = scores[names[0]].device
    counts = torch.stack([torch.stack([torch.isnan(scores[k]).sum(), torch.isinf(scores[k]).sum()]).to(device)
                          for k in names]).tolist()  # fmt: skip
    bad = [(k, n_nan, n_inf) for k, (n_nan, n_inf) in zip(names, counts, strict=True) if n_nan or n_inf]
    if bad:
        parts = [f"'{k}' has {n_nan + n_inf} non-finite values of {scores[k].numel()} ({n_nan} NaN, {n_inf} inf)"
                 for k, n_nan, n_inf in bad]  # fmt: skip
        raise NonFiniteError(
            f"{where}: score {'; '.join(parts)}. The model or its statistics are broken: its training probably "
            "diverged (look at train/loss), or the statistics were fitted on degenerate images",
            quantity=f"score '{bad[0][0]}' ({where})",
        )


def check_finite_values(values: Mapping[str, Any], what: str) -> None:
    """Raise :class:`NonFiniteError` naming each entry (tensor or number) of ``values`` that holds NaN/inf.

    ``what`` names the set, e.g. ``"gradient statistics"`` or ``"thresholds"``.
    """
    bad = []
    for k, v in values.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            finite = bool(_all_finite(v.detach()))
        elif isinstance(v, float | int) and not isinstance(v, bool):
            finite = math.isfinite(v)
        else:
            continue
        if not finite:
            bad.append(k)
    if bad:
        raise NonFiniteError(
            f"{what} {', '.join(bad)} hold NaN or inf values", quantity=f"{what} ({', '.join(bad)})"
        )


def finite_parameters(params: Iterable[torch.Tensor]) -> bool:
    """Whether every parameter tensor is finite (one fused reduction, one host sync)."""
    params = [p.detach() for p in params]
    return not params or bool(_all_finite(_grad_norms(params)))
