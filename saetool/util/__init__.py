"""Foundations every stage may use: the collectives (`Dist`) and the launchers' process group (`accelerator`), the
writer lock of an output folder (and its owner, which other ranks poll), the version, `Background` (a thread
whose error reaches the thread that waits for it) and `wait_while_held` (a rank polls for rank 0's work)."""

from __future__ import annotations

from saetool.util.background import Background, injected_delay, wait_while_held
from saetool.util.distributed import Dist, accelerator, partition_by_cost, split_evenly
from saetool.util.lock import lock_owner, owner_gone, writer_lock
from saetool.util.version import __version__

__all__ = ['Background', 'Dist', '__version__', 'accelerator', 'injected_delay', 'lock_owner', 'owner_gone',
           'partition_by_cost', 'split_evenly', 'wait_while_held', 'writer_lock']
