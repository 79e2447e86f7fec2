"""Small, fast building blocks for the test suite: a word-level tokenizer and a tiny random Llama.

Import them from any test with ``from tests.helpers import ...`` (``tests`` is a package).
"""

from __future__ import annotations

import pathlib

import torch

from saetool.lm.random_models import SPECIAL_TOKENS, WORDS, random_model_dir, word_tokenizer  # noqa: F401


def make_word_tokenizer(words: list[str] = WORDS):
    """saetool.lm.random_models.word_tokenizer: ``<bos>``=0, ``<eos>``=1, ``<unk>``=2, then ``words``."""
    return word_tokenizer(words)


def make_tiny_llama_dir(path: str | pathlib.Path, seed: int = 0, tie_word_embeddings: bool = False) -> pathlib.Path:
    """A tiny random ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads, 2 KV heads, MLP 64) and its word tokenizer
    saved into ``path`` (saetool.lm.random_models.random_model_dir, preset "tiny", 128 positions)."""
    return random_model_dir(path, "tiny", layers=2, seed=seed, tie_word_embeddings=tie_word_embeddings,
                            max_positions=128)


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


def launch(n_procs: int, args: list[str], timeout: int = 240, wait: bool = True, env: dict | None = None):
    """`accelerate launch launch/sweep.py ARGS` with n_procs CPU processes (gloo, one thread each; `env`: more
    environment variables). Waits for it and asserts it succeeded (returns the CompletedProcess), or with wait=False
    returns the Popen of a new session (kill its process group to kill every rank)."""
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n_procs),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(root / "launch" / "sweep.py"), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def kill_processes_with(text: str) -> int:
    """SIGKILL every process whose command line holds `text` (torchrun's workers run in sessions of their own, so
    killing the launcher's process group does not reach them); returns how many were killed."""
    import os
    import signal

    killed = 0
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            pass
    return killed
