"""Saved SAEs: the SAELens folder layout, the sweep index (sweep.json), loading one SAE or a sweep, and interop with
SAELens and the original tool's files."""

from __future__ import annotations

from saetool.saved.folders import (
    DTYPES,
    INDEX_FILE,
    MEMBERS_TMP,
    WEIGHTS_FILE,
    finish_export,
    load_sae,
    load_sweep,
    member_folder_names,
    publish_members,
    read_index,
    single_hook_index,
    start_export,
    write_json,
    write_member,
    write_members,
    write_sweep,
)
from saetool.saved.interop import load_legacy, load_saelens, saelens_cfg
from saetool.saved.sae import SparseLinearAutoencoder

__all__ = ['DTYPES', 'INDEX_FILE', 'MEMBERS_TMP', 'WEIGHTS_FILE', 'SparseLinearAutoencoder', 'finish_export', 'load_legacy', 'load_sae', 'load_saelens', 'load_sweep', 'member_folder_names', 'publish_members', 'read_index', 'saelens_cfg', 'single_hook_index', 'start_export', 'write_json', 'write_member', 'write_members', 'write_sweep']
