"""Text -> tokens: text sources read lazily, the packing policy, the streamed, shuffled contexts of a store, and long
documents tokenised in pieces that equal their whole-document tokenisation."""

from __future__ import annotations

from saetool.text.packing import special_token_ids
from saetool.text.sources import open_documents
from saetool.text.stream import ContextStream

__all__ = ['ContextStream', 'open_documents', 'special_token_ids']
