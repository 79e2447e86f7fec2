"""Random-weight language models of a chosen width, built offline: for tests, benchmarks and GPU checks on machines
that hold no weights and reach no hub (a 98 MB GGUF does not travel to a 64 MiB GPU sandbox; a model of Gemma-2-2B or
Llama-3-8B width with a few layers is built there in seconds).

`random_model_dir(path, preset)` saves a ``LlamaForCausalLM`` with random weights and a word-level tokenizer as a
normal Hugging Face folder that `saetool.lm.load_model(path)` and `saetool generate --model PATH` read. The widths
are those of the named models (hidden size, MLP width, heads, KV heads); the depth is `layers`.
"""

from __future__ import annotations

import pathlib

import torch

__all__ = ["PRESETS", "SPECIAL_TOKENS", "WORDS", "random_model_dir", "word_tokenizer"]

SPECIAL_TOKENS = ["<bos>", "<eos>", "<unk>"]  # ids 0, 1, 2
WORDS = ["the", "a", "an", "and", "or", "but", "of", "to", "in", "on", "at", "by", "for", "with", "from", "as", "is",
         "are", "was", "were", "be", "been", "it", "this", "that", "these", "those", "he", "she", "they", "we", "you",
         "i", "my", "your", "his", "her", "their", "our", "cat", "dog", "bird", "fish", "tree", "house", "river",
         "king", "queen", "city", "paris", "france", "capital", "sun", "moon", "star", "day", "night", "red", "green",
         "blue", "big", "small", "old", "new", "good", "bad"]
# {name: (hidden size, MLP width, attention heads, KV heads)}
PRESETS = {"tiny": (32, 64, 4, 2), "gemma-2-2b-width": (2304, 9216, 8, 4), "llama-3-8b-width": (4096, 14336, 32, 8)}


def word_tokenizer(words: list[str] = WORDS):
    """A word-level ``PreTrainedTokenizerFast``: ``<bos>``=0, ``<eos>``=1, ``<unk>``=2, then ``words``.

    Text is split on whitespace; unknown words map to ``<unk>``. Encoding adds no special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def random_model_dir(path: str | pathlib.Path, preset: str = "tiny", layers: int = 2, seed: int = 0,
                     tie_word_embeddings: bool = False, max_positions: int = 512) -> pathlib.Path:
    """Save a randomly initialised ``LlamaForCausalLM`` of the preset's width (PRESETS) with `layers` blocks and the
    word tokenizer into `path` (config.json, model.safetensors, tokenizer files); returns `path`. Weights are float32,
    drawn by transformers' initialiser after ``torch.manual_seed(seed)``. ValueError for an unknown preset."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    hidden, mlp, heads, kv_heads = PRESETS[preset]
    path, tokenizer = pathlib.Path(path), word_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
