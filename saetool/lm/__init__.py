"""The language model: loading a TransformerLens bridge (embedded SmolLM2, local folders, the hub), hook names and
recording activations."""

from __future__ import annotations

from saetool.lm.hooks import hook_widths, record_activations, resolve_hook_names, validate_hook_names
from saetool.lm.models import EMBEDDED_MODEL, embedded_model_dir, load_model
from saetool.lm.random_models import PRESETS, WORDS, random_model_dir, word_tokenizer

__all__ = ['EMBEDDED_MODEL', 'PRESETS', 'WORDS', 'embedded_model_dir', 'hook_widths', 'load_model', 'random_model_dir', 'record_activations', 'resolve_hook_names', 'validate_hook_names', 'word_tokenizer']
