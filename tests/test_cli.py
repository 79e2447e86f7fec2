"""The CLI: flags map to config fields, bad input exits 2 with one line, help lists every flag."""

import subprocess
import sys

import pytest

from saetool.config import GenerateConfig, SweepConfig, build, field_docs


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


def test_readme_flag_tables_match_the_config_docstrings():
    # the README's tables are saetool.config.markdown_flags verbatim: a new or changed flag must update both
    from pathlib import Path

    from saetool.config import GenerateConfig, SweepConfig, markdown_flags

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for cls in (GenerateConfig, SweepConfig):
        assert markdown_flags(cls) in readme, f"README flag table of {cls.__name__} is stale: python -m saetool.config"


def test_ctrl_c_is_one_line_with_the_resume_hint(monkeypatch, capsys):
    from saetool import cli

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        cli.run_cli({"sweep": interrupted}, ["sweep"])
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume True" in err[0]
