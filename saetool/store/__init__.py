"""The activation store (Zarr v3): layout, stored values, whole-chunk decode, the wait for committed tokens, the
shuffled batch loader and the feed to the training device."""

from __future__ import annotations

from saetool.store.activation_store import ActivationStore
from saetool.store.layout import StoreSpec
from saetool.store.loader import BatchLoader, DeviceFeed
from saetool.store.values import StoreError, to_store_array
from saetool.store.watch import CommitProgress, TokenWatch

__all__ = ['ActivationStore', 'BatchLoader', 'CommitProgress', 'DeviceFeed', 'StoreError', 'StoreSpec', 'TokenWatch',
           'to_store_array']
