"""Foundations every stage may use: the collectives (`Dist`), the writer lock of an output folder, the version."""

from __future__ import annotations

from saetool.util.distributed import Dist, partition_by_cost, split_evenly
from saetool.util.lock import writer_lock
from saetool.util.version import __version__

__all__ = ['Dist', '__version__', 'partition_by_cost', 'split_evenly', 'writer_lock']
