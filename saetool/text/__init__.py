"""Text -> tokens: text sources read lazily, the packing policy, and the streamed, shuffled contexts of a store."""

from __future__ import annotations

from saetool.text.packing import special_token_ids
from saetool.text.sources import open_documents
from saetool.text.stream import ContextStream

__all__ = ['ContextStream', 'open_documents', 'special_token_ids']
