"""Training recipes wired into the sweep: the learning-rate schedule (warm-up restarted at every resampling, case T4,
and decay), resampling and AuxK with their dead-latent state surviving a checkpoint, the b_dec inits, and the W&B run logger."""

import json

import pytest
import torch

import saetool.sweep.driver as sweep_mod
import saetool.train.logs as logs_mod
import saetool.train.setup as setup_mod
import saetool.train.step as step_mod
from saetool.config import SweepConfig
from saetool.ensemble.recipes import geometric_median
from saetool.saved.folders import load_sweep
from saetool.store.activation_store import ActivationStore
from tests.helpers import interrupt_on_call
from tests.synthetic import write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(600, 8, generator=g) * torch.linspace(0.5, 3, 8) + 1.0
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    write_store(path, acts, context_size=4, chunk_size=40)
    return path


def sweep(store, out, log=None, ratio=2, **kw):
    cfg = SweepConfig(dataset_dir=str(store), output_dir=str(out), ratio=ratio, batch_size=30, eval_tokens=40,
                      adam_lr=0.01, device="cpu", report=False, **kw)
    return sweep_mod.run_sweep(cfg, log=log or (lambda *a: None))


def test_lr_warmup_restarts_at_every_resampling_and_decays(store, tmp_path, monkeypatch):
    monkeypatch.setattr(logs_mod, "LOG_EVERY", 1)
    lines = []
    # d_sae 64 and k 1, 2: at most 60 latents fire in a batch of 30, so some are dead (window: one batch) at
    # every resampling
    sweep(store, tmp_path / "out", log=lines.append, ratio=8, architecture="topk", k_values=[1, 2], lr_warmup_steps=4,
          lr_decay_steps=5, resample_every=8, dead_window=30)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").open()]
    # 19 steps (560 training rows / 30); step s (0-based) uses min(1, (s - r) / 4) * min(1, (19 - s) / 5), r the
    # last resampling step <= s (8, 16)
    hand = [0, .25, .5, .75, 1, 1, 1, 1, 0, .25, .5, .75, 1, 1, 1, .8, 0, .25 * .4, .5 * .2]
    assert [r["step"] for r in log] == list(range(1, 20))
    assert [r["lr"] for r in log] == pytest.approx([0.01 * v for v in hand])
    resampled = [line for line in lines if "resampled" in line]
    assert [line.split(":")[0] for line in resampled] == ["step 8", "step 16"]


def test_resume_with_auxk_and_resampling_equals_uninterrupted(store, tmp_path, monkeypatch):
    kw = {"architecture": "topk", "k_values": [2, 3], "auxk_coefficient": 1 / 32, "k_aux": 4, "resample_every": 7,
          "dead_window": 60, "grad_clip_norm": 0.5}
    sweep(store, tmp_path / "ref", **kw)
    interrupt_on_call(monkeypatch, step_mod, "train_step", 13)
    with pytest.raises(KeyboardInterrupt):
        sweep(store, tmp_path / "out", checkpoint_every=5, **kw)
    monkeypatch.undo()
    state = torch.load(tmp_path / "out" / "checkpoint" / "step_10" / "rank0.pt", weights_only=False)
    assert state["dead_since"].shape == (2, 16) and state["dead_since"].max() > 0
    sweep(store, tmp_path / "out", checkpoint_every=5, resume=True, **kw)
    a, b = load_sweep(tmp_path / "ref"), load_sweep(tmp_path / "out")
    for key in a:
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(a[key], name), getattr(b[key], name)), (key, name)


def test_b_dec_init_geometric_median_and_mean(store):
    s = ActivationStore.open(store)
    hook = s.resolve_hook(None)
    rows = (0, 560)
    x = s.read_rows(hook, *rows, torch.float64)
    torch.testing.assert_close(setup_mod.b_dec_init("mean", s, hook, rows), x.mean(0).float())
    median = setup_mod.b_dec_init("geometric_median", s, hook, rows)
    torch.testing.assert_close(median, geometric_median(x).float())
    # the geometric median minimises the summed distances: moving it in any axis direction costs more
    def cost(m):
        return (x - m.double()).norm(dim=-1).sum()

    for j in range(8):
        step = torch.zeros(8)
        step[j] = 1e-2
        assert cost(median) < cost(median + step) and cost(median) < cost(median - step)
    assert setup_mod.b_dec_init("zeros", s, hook, rows) is None


def test_wandb_project_logs_every_member_to_a_run(store, tmp_path, monkeypatch):
    # W&B is not installed offline: a stand-in records what the sweep hands to saetool.train.wandb_log.WandbLogger
    from saetool.train import wandb_log

    calls = {}

    class FakeRun:
        def __init__(self, names, project, name, config, log):
            calls.update(names=names, project=project, name=name, lr=config["adam_lr"], train=[], eval=None)

        def log_train(self, step, tokens, stats):
            calls["train"].append((step, tokens, {k: v.tolist() for k, v in stats.items()}))

        def log_eval(self, metrics):
            calls["eval"] = metrics

        def finish(self):
            calls["finished"] = True

    monkeypatch.setattr(wandb_log, "WandbLogger", FakeRun)
    index = sweep(store, tmp_path / "run1", l1_values=[1e-3, 1e-2], wandb_project="saes")
    assert calls["project"] == "saes" and calls["name"] == "run1" and calls["lr"] == 0.01
    assert calls["names"] == [m["path"].split("/")[-1] for m in index["members"]]
    log = [json.loads(line) for line in (tmp_path / "run1" / "train_log.jsonl").open()]
    assert [(s, t) for s, t, _ in calls["train"]] == [(r["step"], r["tokens"]) for r in log] == [(1, 30)]
    assert calls["train"][0][2]["l0"] == log[0]["l0"]
    assert calls["eval"] == [m["metrics"] for m in index["members"]] and calls["finished"]


def test_wandb_project_without_wandb_fails_before_writing(store, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match="pip install wandb"):
        sweep(store, tmp_path / "run2", wandb_project="saes")
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("kw,message", [
    ({"lr_decay_steps": 20}, "--lr_decay_steps 20 is more than this run's 19 steps"),
    ({"threshold_lr": 0.05}, "--threshold_lr applies to batchtopk and matryoshka_batchtopk only"),
    ({"architecture": "topk", "k_values": [2], "k_aux": 4}, "--k_aux needs --auxk_coefficient > 0"),
    ({"architecture": "batchtopk", "k_values": [2], "threshold_lr": 1.5}, r"--threshold_lr must be in \(0, 1\]"),
])
def test_settings_that_cannot_act_are_refused_before_writing(store, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        sweep(store, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_wandb_that_cannot_start_is_a_one_line_error(store, tmp_path, monkeypatch):
    import sys
    import types

    def init(**kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.\nmore details")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(ValueError, match=r"W&B could not start a run \(No API key configured.*\); run `wandb login`"):
        sweep(store, tmp_path / "run3", wandb_project="saes")
    assert not (tmp_path / "run3").exists()


def test_default_clips_each_standard_member_at_1_over_d_in_like_a_lone_clipped_sae(store, tmp_path):
    # the oracle: textbook single SAEs on the sweep's batches, torch.nn.utils.clip_grad_norm_ at 1 / d_in = 1/8
    from saetool.store.loader import BatchLoader
    from tests.ensemble.test_ensemble import PlainSAE

    l1 = [1e-3, 3e-2]
    index = sweep(store, tmp_path / "default", l1_values=l1, b_dec_init="zeros")
    assert index["training"]["grad_clip_norm"] == 1 / 8
    s = ActivationStore.open(store)
    batches = [x.float() for x in BatchLoader(s, s.resolve_hook(None), 30, (0, 560), seed=0).epoch(0)]
    trained, clipped = load_sweep(tmp_path / "default"), 0
    for i, v in enumerate(l1):
        ref = PlainSAE(8, 16, i, l1=v)
        opt = torch.optim.Adam(ref.parameters(), lr=0.01)
        for x in batches:
            opt.zero_grad()
            ref(x).backward()
            clipped += int(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1 / 8) > 1 / 8)
            opt.step()
            with torch.no_grad():
                ref.W_dec /= ref.W_dec.norm(dim=-1, keepdim=True)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(trained[v], name), getattr(ref, name).detach(), atol=1e-5, rtol=0)
    assert clipped > 0                                  # the clip acted
    sweep(store, tmp_path / "off", l1_values=l1, b_dec_init="zeros", grad_clip_norm=0.0)
    unclipped = load_sweep(tmp_path / "off")
    assert (unclipped[l1[0]].W_enc - trained[l1[0]].W_enc).abs().max() > 1e-3


def test_grad_clip_norm_auto_is_1_over_d_out_for_every_architecture_but_topk():
    clipped = ("standard", "gated", "batchtopk", "matryoshka_batchtopk", "jumprelu")
    assert [SweepConfig(architecture=a).clip_norm(576) for a in clipped] == [1 / 576] * 5
    assert SweepConfig(architecture="topk").clip_norm(576) == 0.0
    assert SweepConfig(architecture="topk", grad_clip_norm=0.5).clip_norm(576) == 0.5
    assert SweepConfig(grad_clip_norm=0.0).clip_norm(576) == 0.0


def test_grad_clip_norm_flag_reads_auto_none_and_numbers():
    from saetool.config import build

    assert [build(SweepConfig, {"grad_clip_norm": v}).grad_clip_norm for v in ("auto", "None", None, "0", 0.5)] \
        == [None, None, None, 0.0, 0.5]
    with pytest.raises(ValueError, match=r"--grad_clip_norm expects a number, got 'off'"):
        build(SweepConfig, {"grad_clip_norm": "off"})
    with pytest.raises(ValueError, match=r"grad_clip_norm"):
        build(SweepConfig, {"grad_clip_norm": -1})


def test_grad_clip_norm_must_be_finite():
    from saetool.config import build

    for v in ("inf", "nan"):
        with pytest.raises(ValueError, match=r"--grad_clip_norm must be a finite number >= 0, or auto"):
            build(SweepConfig, {"grad_clip_norm": v})
