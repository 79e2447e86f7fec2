"""Small, fast building blocks for the test suite: a word-level tokenizer and a tiny random Llama.

Import them from any test with ``from tests.helpers import ...`` (``tests`` is a package).
"""

from __future__ import annotations

import pathlib

import torch

SPECIAL_TOKENS = ["<bos>", "<eos>", "<unk>"]  # ids 0, 1, 2

WORDS = ["the", "a", "an", "and", "or", "but", "of", "to", "in", "on", "at", "by", "for", "with", "from", "as", "is", "are", "was", "were", "be", "been", "it", "this", "that", "these", "those", "he", "she", "they", "we", "you", "i", "my", "your", "his", "her", "their", "our", "cat", "dog", "bird", "fish", "tree", "house", "river", "king", "queen", "city", "paris", "france", "capital", "sun", "moon", "star", "day", "night", "red", "green", "blue", "big", "small", "old", "new", "good", "bad"]


def make_word_tokenizer(words: list[str] = WORDS):
    """A word-level ``PreTrainedTokenizerFast``: ``<bos>``=0, ``<eos>``=1, ``<unk>``=2, then ``words``.

    Text is split on whitespace; unknown words map to ``<unk>``. Encoding adds no special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def make_tiny_llama_dir(path: str | pathlib.Path, seed: int = 0, tie_word_embeddings: bool = False) -> pathlib.Path:
    """Save a randomly initialised tiny ``LlamaForCausalLM`` and its word tokenizer into ``path``.

    Shape: hidden 32, 2 layers, 4 heads (d_head 8), 2 KV heads, intermediate 64, vocab = tokenizer size.
    The result is a normal Hugging Face model folder (config.json, model.safetensors, tokenizer files).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = pathlib.Path(path)
    tokenizer = make_word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_plain_sae(ref: torch.nn.Module, data: list[torch.Tensor], lr: float) -> torch.nn.Module:
    """Train a plain one-SAE module (its forward returns the loss) the textbook way, as the ensemble oracle:
    torch.optim.Adam over `data`, then the decoder rows back to unit norm after every step. Returns `ref`."""
    opt = torch.optim.Adam(ref.parameters(), lr=lr)
    for x in data:
        opt.zero_grad()
        ref(x).backward()
        opt.step()
        with torch.no_grad():
            ref.W_dec /= ref.W_dec.norm(dim=-1, keepdim=True)
    return ref


def interrupt_on_call(monkeypatch, module, name: str, n: int) -> None:
    """Make module.<name> raise KeyboardInterrupt on its n-th call (a kill mid-run); monkeypatch.undo() or the end
    of the test restores it."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
