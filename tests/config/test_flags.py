"""docs/flags.md is generated from the config docstrings (`python -m saetool.config`): a new or changed flag must
regenerate it, and the CLI's help says the same."""

import subprocess
import sys
from pathlib import Path

from saetool.config import GenerateConfig, NeuronpediaConfig, ReportConfig, SparsifyConfig, SweepConfig
from saetool.config.flags import COMMANDS, field_docs, flags_page, markdown_flags

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "flags.md"


def test_the_flags_page_is_what_the_generator_writes():
    page = PAGE.read_text()
    assert page == flags_page(), "docs/flags.md is stale: regenerate it with `python -m saetool.config`"
    # every command's table is saetool.config.markdown_flags of its config, verbatim, under its own heading
    for cls, command, _ in COMMANDS:
        assert f"## `{command}`" in page
        assert markdown_flags(cls) in page, f"the {command} table of docs/flags.md is stale: python -m saetool.config"


def test_every_flag_of_every_command_is_on_the_page_with_its_docstring():
    configs = {cls for cls, _, _ in COMMANDS}
    assert configs == {GenerateConfig, SweepConfig, ReportConfig, NeuronpediaConfig, SparsifyConfig}
    page = PAGE.read_text()
    for cls in configs:
        for name in cls.__dataclass_fields__:
            assert field_docs(cls)[name], f"{cls.__name__}.{name} has no docstring"
            assert f"| `--{name}` |" in page and field_docs(cls)[name] in page


def test_python_m_saetool_config_writes_the_page(tmp_path):
    out = tmp_path / "flags.md"
    r = subprocess.run([sys.executable, "-m", "saetool.config", str(out)], check=False, capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == flags_page()


def test_the_readme_links_to_the_flags_page_instead_of_holding_tables():
    readme = (ROOT / "README.md").read_text()
    assert "docs/flags.md" in readme
    assert "| flag | default | meaning |" not in readme
