"""Flags -> validated configs: `build(cls, kwargs)` parses CLI/API keyword arguments into a config dataclass and
validates it; unknown flags and bad values raise ValueError with a one-line message naming the flag."""

from __future__ import annotations

import contextlib
import dataclasses


def default_device() -> str:
    """cuda if available, else cpu"""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def join_names(items) -> str:
    """("a",) -> "a"; ("a", "b", "c") -> "a, b and c"."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def check_device(device: str, name: str = "device") -> None:
    """ValueError naming --device for a string torch cannot parse, or a device this machine does not have
    (cuda without CUDA, cuda:N beyond the visible GPUs, mps without MPS)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--{name} {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        check(torch.cuda.is_available(), name, f"{device}: CUDA is not available here (torch {torch.__version__}"
               f"{'' if torch.version.cuda else ', built without CUDA'}); use --{name} cpu")
        check(dev.index is None or dev.index < torch.cuda.device_count(), name,
               f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        check(torch.backends.mps.is_available(), name, f"{device}: MPS is not available here; use --{name} cpu")
    else:
        check(dev.type == "cpu", name, f"{device}: saetool runs on cpu, cuda or mps")


def check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"--{name} {message}")


def _integer(value):
    """int(value) for ints, integral floats and their strings; ValueError for anything else (3.5, "3.5", True)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    f = float(value)
    if not f.is_integer():
        raise ValueError(value)
    return int(f)


def _as_list(value, item_type, name: str):
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(" ", ",").split(",") if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    try:
        return [(_integer if item_type is int else item_type)(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"--{name} expects a list of {item_type.__name__}, got {value!r}") from None


def build(cls, kwargs: dict):
    """Build and validate a config dataclass from keyword arguments (CLI flags); ValueError on unknown flags."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"unknown flag --{unknown[0]}; valid flags: {', '.join('--' + n for n in fields)}")
    values = {}
    for name, value in kwargs.items():
        hint = str(fields[name].type)
        if hint.startswith("list[str]"):
            value = _as_list(value, str, name)
        elif hint.startswith("list[int]"):
            value = _as_list(value, int, name)
        elif hint.startswith("list[float]"):
            value = _as_list(value, float, name)
        elif hint.startswith("bool") and value is not None:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                value = value.lower() in ("true", "1")
            if not isinstance(value, bool):
                raise ValueError(f"--{name} expects True or False, got {value!r}")
        elif hint.startswith("int") and value is not None:
            try:
                value = _integer(value)
            except (TypeError, ValueError):
                raise ValueError(f"--{name} expects an integer, got {value!r}") from None
        elif hint.startswith("float") and hint.endswith("None") and str(value).lower() in ("auto", "none"):
            value = None  # an optional number's automatic setting (--grad_clip_norm auto)
        elif hint.startswith("float") and value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"--{name} expects a number, got {value!r}") from None
        elif hint.startswith("str") and value is not None:
            value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        values[name] = value
    cfg = cls(**values)
    cfg.validate()
    return cfg
