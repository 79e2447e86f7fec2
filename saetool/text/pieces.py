"""A long document tokenised in bounded pieces whose tokens, joined, equal the whole document's tokenisation.

`next_piece(encode, text, start, chars=W, context=O)` returns the token ids of ``text[start:end]`` and ``end``; called
again from ``end`` until ``end == len(text)``, the pieces' ids joined are ``encode([text])[0]``, while each call
tokenises about ``W + 2 O`` characters (`saetool.text.stream` uses it for documents longer than one tokenisation
batch, so a 50M-character document costs the memory and time of the tokens the budget keeps, plus one piece).
``encode(list[str]) -> list[list[int]]`` is `saetool.text.packing.encode_texts` bound to a tokenizer.

The scheme: seams, each certified by the tokenizer
---------------------------------------------------
A *seam* is a whitespace character between two non-whitespace characters (``"word| next"``: the regex
``(?<=\\S)\\s(?=\\S)``); the piece ends at the first seam ``c >= start + W``. It is accepted only if the tokenizer
certifies it on the window ``text[start : c + O]`` (O characters of right context)::

    encode([text[start : c + O]])[0] == K + encode([text[c : c + O]])[0]

and the piece's tokens are ``K``. The certificate says two things, with ids alone: (1) no token crosses ``c`` (the
tokens before ``c`` are complete, whatever follows within O characters), and (2) the text from ``c`` on is tokenised
the same with and without the text before it, so the next piece can start at ``c`` with no left context. By
induction over the seams, the pieces joined equal the whole document's tokenisation, provided the tokenizer decides
(1) and (2) from fewer than O characters to the right of the seam. That holds for the tokenizers of current LMs: a
pre-tokenizer regex cuts the text into words (GPT-2, SmolLM2, Llama 3, Qwen: ``" ?\\p{L}+"``-style runs, digits,
punctuation, whitespace), whose matching decides a boundary at a whitespace between two non-whitespace characters
from the characters next to it and never looks behind a match boundary, and the model (BPE, WordPiece, Unigram)
runs inside each word, so a long word to the right of ``c`` (cut short at ``c + O`` in both tokenisations) cannot
change the tokens before ``c``. A regex match that does cross the seam (Llama 3 joins ``".\\n"``) fails the
certificate, and the next seam is tried. `tests/text/test_long_documents.py` checks the joined pieces against the
tokenizer on the whole text for SmolLM2's tokenizer (windows down to 1 character) and for BPEs trained with Llama 3's
regex, SentencePiece's ``Metaspace`` and Llama 2's legacy normalizer.

Why not the tokenizer's offset mapping (keep the tokens whose offsets end before a safe point): the certificate
needs ids only, so it works for slow tokenizers too, and it checks (2), which offsets cannot (a window starting
where the whole-document tokenisation does not start a word is tokenised differently with no sign in the offsets;
byte-level ``trim_offsets`` also moves start offsets).

Refused seams: SentencePiece's ``Metaspace`` pre-tokenizer prepends ``▁`` to a text that does not start with one, so
``"\\nis"`` alone gets an extra token and seams at newlines are refused (seams at spaces pass); Llama 2's legacy fast
tokenizer prepends ``▁`` in its normalizer to whatever it is given, so ``" is"`` alone becomes ``"▁▁is"`` and no seam
passes. A refused seam costs one more window; after `SEAM_TRIES` refused seams in one piece the rest of the document
is tokenised whole (the old cost, still the right tokens). A piece also grows past W up to the next seam (a run
without whitespace is never cut), and the rest is tokenised whole when no seam is left in it (a long text without
whitespace, e.g. Chinese or Japanese).
"""

from __future__ import annotations

import re
from collections.abc import Callable

SEAM = re.compile(r"(?<=\S)\s(?=\S)")
SEAM_TRIES = 8  # seams tried per piece before the rest of the document is tokenised whole

Encode = Callable[[list[str]], list[list[int]]]


def next_piece(encode: Encode, text: str, start: int, *, chars: int, context: int,
               tries: int = SEAM_TRIES) -> tuple[list[int], int]:
    """Token ids of ``text[start:end]`` and ``end`` (module docstring): a certified seam at or after ``start + chars``,
    or ``len(text)`` when the rest is short (ends within ``context`` of the seam), has no seam, or `tries` seams
    fail. ``start`` must be 0 or an ``end`` returned before; ``chars``, ``context`` >= 1."""
    n, pos = len(text), start + chars
    for _ in range(tries):
        seam = SEAM.search(text, pos) if pos < n else None
        if seam is None or seam.start() + context >= n:
            break
        c = seam.start()
        window, right = encode([text[start : c + context], text[c : c + context]])
        keep = len(window) - len(right)
        if keep >= 0 and window[keep:] == right:
            return window[:keep], c
        pos = c + 1
    return encode([text[start:]])[0], n
