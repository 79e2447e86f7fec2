"""The CLI: flags map to config fields, bad input exits 2 with one line, help lists every flag."""

import subprocess
import sys

import pytest

from saetool.config import GenerateConfig, SweepConfig, build
from saetool.config.flags import field_docs


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "saetool.cli", *args], check=False, capture_output=True, text=True,
                          timeout=120)


def test_flags_are_parsed_into_typed_fields():
    cfg = build(GenerateConfig, {"locations": "residual,mlp", "layers": (2, 3), "n_chunks": 4, "prepend_bos": "False"})
    assert cfg.locations == ["residual", "mlp"] and cfg.layers == [2, 3] and cfg.n_chunks == 4
    assert cfg.prepend_bos is False
    cfg = build(SweepConfig, {"l1_values": [0, "1e-3"], "ratio": "8", "save_after_every": True})
    assert cfg.l1_values == [0.0, 1e-3] and cfg.ratio == 8.0 and cfg.save_after_every is True


@pytest.mark.parametrize("kwargs,message", [
    ({"no_such_flag": 1}, "unknown flag --no_such_flag"),
    ({"chunk_size": 100}, "--chunk_size must be a positive multiple of context_size=128"),
    ({"n_chunks": 1.5}, "--n_chunks expects an integer"),
    ({"n_chunks": "2.5"}, "--n_chunks expects an integer, got '2.5'"),
    ({"batch_size": True}, "--batch_size expects an integer, got True"),
    ({"layers": 3.5}, r"--layers expects a list of int, got \[3.5\]"),
    ({"layers": "3,4.5"}, r"--layers expects a list of int, got \['3', '4.5'\]"),
    ({"dtype": "int8"}, "--dtype must be float16, bfloat16 or float32"),
])
def test_bad_generate_flags(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(GenerateConfig, kwargs)


def test_integral_values_are_accepted_as_integers():
    cfg = build(GenerateConfig, {"layers": "3,4.0", "n_chunks": "2", "batch_size": 8.0})
    assert cfg.layers == [3, 4] and cfg.n_chunks == 2 and cfg.batch_size == 8


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--l1_values", "0.001", "0.01"], "unexpected argument '0.01' (after --l1_values 0.001)"),
    (["generate", "--layers", "3", "5"], "unexpected argument '5' (after --layers 3)"),
    (["sweep", "stray", "--ratio", "4"], "unexpected argument 'stray'"),
    (["report", "out", "extra"], "unexpected argument 'extra' (after out)"),
    (["generate", "--layers=3", "5"], "unexpected argument '5' (after --layers=3)"),
])
def test_stray_arguments_are_refused_before_any_work(monkeypatch, capsys, argv, message):
    from saetool import cli

    def work(*a, **k):
        raise AssertionError("the command ran")

    with pytest.raises(SystemExit) as exit_:
        cli.run_cli({"generate": work, "sweep": work, "report": work}, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"saetool: error: {message}") and "\n" not in err


def test_flag_values_and_the_report_folder_are_not_stray(monkeypatch):
    from saetool import cli

    seen = []
    commands = {"generate": lambda **k: seen.append(k), "report": lambda output_dir=None, **k: seen.append(output_dir)}
    cli.run_cli(commands, ["generate", "--layers", "3,5", "--prepend_bos", "--concat=False", "--seed", "2"])
    cli.run_cli(commands, ["report", "runs/x", "--max_rows", "4"])
    assert seen[0] == {"layers": (3, 5), "prepend_bos": True, "concat": False, "seed": 2} and seen[1] == "runs/x"


def test_every_field_has_help():
    for cls in (GenerateConfig, SweepConfig):
        docs = field_docs(cls)
        assert set(docs) == set(cls.__dataclass_fields__), cls


def test_cli_errors_are_one_line_with_status_2(tmp_path):
    r = run_cli("sweep", "--dataset_dir", str(tmp_path / "missing.zarr"), "--output_dir", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"saetool: error: no activation store at {tmp_path / 'missing.zarr'}: run " \
                               f"`saetool generate --dataset_folder {tmp_path / 'missing.zarr'}` first"
    assert not (tmp_path / "o").exists()
    r = run_cli("sweep", "--bogus", "1")
    assert r.returncode == 2 and r.stderr.startswith("saetool: error: unknown flag --bogus")
    r = run_cli("sweep", "--ratio", "-1")
    assert r.returncode == 2 and r.stderr.strip() == "saetool: error: --ratio must be > 0"


def test_help_lists_every_flag_and_exits_0():
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    assert all(f"--{name} " in r.stdout for name in GenerateConfig.__dataclass_fields__)
    r = run_cli("sweep", "--help")
    assert r.returncode == 0 and "--ratio (4.0): Dictionary size over input size" in r.stdout


def test_ctrl_c_is_one_line_with_the_resume_hint(monkeypatch, capsys):
    from saetool import cli

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        cli.run_cli({"sweep": interrupted}, ["sweep"])
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume True" in err[0]


# a value away from the default for every flag that acts on some architectures only (issue 13, item 12)
OFF_DEFAULT = {"l1_values": [1e-3], "l1_value_min": -3.0, "l1_value_max": -1.0, "l1_value_n": 4, "l1_warmup_steps": 5,
               "k_values": [8], "auxk_coefficient": 0.03, "threshold_lr": 0.05, "matryoshka_widths": [4, 8],
               "l0_values": [1e-3], "jumprelu_bandwidth": 0.01, "jumprelu_init_threshold": 0.1, "decoder_norm_l1": True,
               "tied": True, "resample_every": 10, "target_hook": "blocks.0.hook_mlp_out"}


def test_every_flag_is_refused_on_each_architecture_it_cannot_act_on():
    from saetool.config import ARCHITECTURE_FLAGS, join_names
    from saetool.saes import ARCHITECTURES

    assert set(OFF_DEFAULT) == set(ARCHITECTURE_FLAGS)
    refused = 0
    for flag, acts_on in ARCHITECTURE_FLAGS.items():
        for arch in ARCHITECTURES:
            kwargs = {"architecture": arch, flag: OFF_DEFAULT[flag]}
            if arch in acts_on:
                assert getattr(build(SweepConfig, kwargs), flag) == OFF_DEFAULT[flag]
                continue
            with pytest.raises(ValueError) as e:
                build(SweepConfig, kwargs)
            assert str(e.value) == f"--{flag} applies to {join_names(acts_on)} only, not --architecture {arch}"
            refused += 1
    assert refused == 62
    assert join_names(("standard",)) == "standard" and join_names(("a", "b", "c")) == "a, b and c"


@pytest.mark.parametrize("kwargs,message", [
    ({"l1_values": [1e-3, 1.004e-3, 1e-3]}, "--l1_values has the value 0.001 twice (each member needs its own)"),
    ({"architecture": "topk", "k_values": "2,2"}, "--k_values has the value 2 twice (each member needs its own)"),
    ({"architecture": "jumprelu", "l0_values": [0.1, 0.1]}, "--l0_values has the value 0.1 twice (each member needs its own)"),
    ({"l1_value_min": -3, "l1_value_max": -3}, ("--l1_value_max must differ from --l1_value_min for --l1_value_n 16 "
                                               "distinct values")),
    ({"architecture": "jumprelu", "kernel": "fused"},
     "--kernel fused has no architecture jumprelu; it has standard and topk (use --kernel autograd or auto)"),
    ({"architecture": "topk", "kernel": "fused", "auxk_coefficient": 0.03},
     "--kernel fused has no --auxk_coefficient; use --kernel autograd (or auto)"),
    ({"l1_values": [1e-3, 1e-2], "k_values": [4]}, ("--k_values applies to topk, batchtopk and matryoshka_batchtopk "
                                                   "only, not --architecture standard")),
])
def test_settings_that_cannot_act_are_refused_by_the_config(kwargs, message):
    with pytest.raises(ValueError) as e:
        build(SweepConfig, kwargs)
    assert str(e.value) == message


def test_ensembles_take_the_shared_flags_that_act_on_them_and_are_all_checked_before_training(tmp_path):
    from saetool.sweep.driver import ensemble_configs

    cfg = build(SweepConfig, {"output_dir": str(tmp_path), "l1_warmup_steps": 5, "k_values": [8],
                              "ensembles": [{"architecture": "standard"}, {"architecture": "topk"}]})
    (_, standard), (_, topk) = ensemble_configs(cfg)
    assert (standard.l1_warmup_steps, standard.k_values) == (5, None)
    assert (topk.l1_warmup_steps, topk.k_values) == (0, [8])
    bad = [{"architecture": "standard"}, {"architecture": "topk", "l1_values": [1e-3]}]
    with pytest.raises(ValueError) as e:
        ensemble_configs(build(SweepConfig, {"output_dir": str(tmp_path), "ensembles": bad}))
    assert str(e.value) == ("ensemble '1_topk': --l1_values applies to standard and gated only, not --architecture "
                            "topk")
    with pytest.raises(ValueError) as e:
        ensemble_configs(build(SweepConfig, {"output_dir": str(tmp_path), "threshold_lr": 0.05,
                                             "ensembles": [{"architecture": "topk"}]}))
    assert str(e.value) == ("--threshold_lr applies to batchtopk and matryoshka_batchtopk only, and no ensemble is one "
                            "(topk)")
    with pytest.raises(ValueError) as e:
        ensemble_configs(build(SweepConfig, {"output_dir": str(tmp_path),
                                             "ensembles": [{"name": "a"}, {"name": "a", "ratio": 2}]}))
    assert str(e.value) == "--ensembles: two ensembles are named 'a' (each needs its own folder)"
    for name in ("../escaped", "a/b", ".hidden"):  # never a folder outside OUTPUT_DIR
        with pytest.raises(ValueError, match="must be a plain folder name"):
            ensemble_configs(build(SweepConfig, {"output_dir": str(tmp_path), "ensembles": [{"name": name}]}))
