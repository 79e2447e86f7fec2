"""Run logging for sweeps: plain log lines by default, Weights & Biases optionally.

Both loggers take the same calls, once per member-stacked statistic (tensors ``[n_members]``):

* ``log_train(step, tokens, stats)``: training statistics of one step (``loss``, ``mse``, ``sparsity``, ``l0``
  from ``saetool.ensemble.stack.train_step``), plus optionally ``firing_frequency [n_members, d_sae]`` over a window of
  recent batches, from which the dead fraction and a log10 density histogram are logged;
* ``log_eval(metrics)``: the held-out results, one dict per member;
* ``finish()``.

W&B keys are ``"<member>/<stat>"`` with ``<member>`` the member's folder name (``standard_l1_coefficient_1.00e-03``),
so each member gets its own panel group; the density histogram is ``wandb.Histogram`` of ``log10`` of the alive
latents' firing frequencies (dead latents are logged as ``dead_fraction``). ``wandb`` is imported only when a
``WandbLogger`` is created; it is never required. In tests use ``mode="offline"`` (nothing leaves the machine; the run
is written under ``dir``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["PlainLogger", "WandbLogger", "make_logger"]

_TRAIN_KEYS = ("loss", "mse", "sparsity", "l0")


def _dead_fraction(firing_frequency: Tensor) -> Tensor:
    """[n_members, d_sae] -> [n_members] float64 fraction of latents with frequency 0."""
    return (firing_frequency == 0).to(torch.float64).mean(-1)


class PlainLogger:
    """One log line per call, ranges over members (``log`` defaults to ``print``)."""

    def __init__(self, member_names: Sequence[str], log: Callable[[str], None] = print):
        self.member_names = list(member_names)
        self.log = log

    def log_train(self, step: int, tokens: int, stats: dict[str, Tensor], firing_frequency: Tensor | None = None
                  ) -> None:
        """stats: ``{name: [n_members]}``; firing_frequency: optional ``[n_members, d_sae]``."""
        parts = [f"step {step}", f"tokens {tokens}"]
        for key in _TRAIN_KEYS:
            if key in stats:
                v = stats[key].detach().float().cpu()
                parts.append(f"{key} {float(v.min()):.4g}..{float(v.max()):.4g}")
        if firing_frequency is not None:
            dead = _dead_fraction(firing_frequency.detach().cpu())
            parts.append(f"dead {100 * float(dead.min()):.1f}..{100 * float(dead.max()):.1f}%")
        self.log("train: " + ", ".join(parts))

    def log_eval(self, metrics: Sequence[dict]) -> None:
        """metrics: one dict of numbers per member, in member order."""
        for name, m in zip(self.member_names, metrics):
            values = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
            self.log(f"eval {name}: {values}")

    def finish(self) -> None:
        pass


class WandbLogger(PlainLogger):
    """Logs to a W&B run (and, like :class:`PlainLogger`, nothing to stdout unless ``echo``).

    Args:
        member_names: one name per member (key prefix).
        project, name, config: passed to ``wandb.init``.
        mode: ``"online"``, ``"offline"`` (tests) or ``"disabled"``; None lets W&B decide (``WANDB_MODE``).
        dir: where W&B writes its run folder.
        echo: also print the plain log lines.
    """

    def __init__(self, member_names: Sequence[str], project: str = "saetool", name: str | None = None,
                 config: dict | None = None, mode: str | None = None, dir: str | None = None, echo: bool = False,
                 log: Callable[[str], None] = print):
        super().__init__(member_names, log)
        try:
            import wandb
        except ImportError:
            raise ValueError("W&B logging needs the wandb package: pip install wandb") from None
        self._wandb = wandb
        self.echo = echo
        try:
            self.run = wandb.init(project=project, name=name, config=config or {}, mode=mode, dir=dir,
                                  reinit="create_new")
        except Exception as error:  # not logged in, offline without WANDB_MODE=offline, bad project...
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"W&B could not start a run ({first}); run `wandb login`, or set WANDB_MODE=offline "
                             "to keep the run on disk") from error

    def _member_dict(self, values: dict[str, Tensor]) -> dict:
        out = {}
        for key, v in values.items():
            v = v.detach().to(torch.float64).cpu().reshape(-1)
            for name, x in zip(self.member_names, v.tolist()):
                out[f"{name}/{key}"] = x
        return out

    def log_train(self, step: int, tokens: int, stats: dict[str, Tensor], firing_frequency: Tensor | None = None
                  ) -> None:
        data = self._member_dict({k: v for k, v in stats.items() if isinstance(v, Tensor)})
        data["tokens"] = tokens
        if firing_frequency is not None:
            freq = firing_frequency.detach().to(torch.float64).cpu()
            data.update(self._member_dict({"dead_fraction": _dead_fraction(freq)}))
            for name, f in zip(self.member_names, freq):
                alive = f[f > 0]
                if alive.numel():
                    data[f"{name}/log10_density"] = self._wandb.Histogram(torch.log10(alive).numpy())
        self.run.log(data, step=step)
        if self.echo:
            super().log_train(step, tokens, stats, firing_frequency)

    def log_eval(self, metrics: Sequence[dict]) -> None:
        for name, m in zip(self.member_names, metrics):
            for k, v in m.items():
                if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    self.run.summary[f"{name}/eval_{k}"] = v
        if self.echo:
            super().log_eval(metrics)

    def finish(self) -> None:
        self.run.finish()


def make_logger(member_names: Sequence[str], use_wandb: bool = False, log: Callable[[str], None] = print,
                **wandb_kwargs) -> PlainLogger:
    """A :class:`WandbLogger` when ``use_wandb`` (``wandb_kwargs`` go to it), else a :class:`PlainLogger`."""
    if use_wandb:
        return WandbLogger(member_names, log=log, **wandb_kwargs)
    return PlainLogger(member_names, log)
