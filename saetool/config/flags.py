"""Flag documentation from the config dataclasses: the CLI's --help lines and the README's flag tables.

Each flag's help is the docstring written under its field (GenerateConfig, SweepConfig, ReportConfig and the
export configs). `python -m saetool.config [README.md]` rewrites the README's tables; tests/cli/test_cli.py checks
that README.md holds them verbatim.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import pathlib
import sys
import textwrap
from functools import cache

from saetool.config.generate import GenerateConfig
from saetool.config.report import NeuronpediaConfig, ReportConfig, SparsifyConfig
from saetool.config.sweep import SweepConfig


@cache
def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring written under it in the class body} (the CLI help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in itertools.pairwise(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def help_text(cls) -> str:
    """One line per flag: --name (default): help."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name} ({default!r}): {field_docs(cls).get(f.name, '')}")
    return "\n".join(lines)


def markdown_flags(cls) -> str:
    """The README's flag table of a config dataclass: | `--name` | `default` | help | (a computed default shows
    its factory's docstring). tests/cli/test_cli.py checks that README.md holds it verbatim."""
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:  # a factory with a docstring describes a computed default; lambdas give their value
            default = f.default_factory.__doc__ or f.default_factory()
        lines.append(f"| `--{f.name}` | `{default}` | {field_docs(cls).get(f.name, '')} |")
    return "\n".join(lines)


def readme_tables() -> list[tuple[type, str]]:
    """(config class, README heading) of every flag table in README.md."""
    return [(GenerateConfig, "### `saetool generate` flags"), (SweepConfig, "### `saetool sweep` flags"),
            (ReportConfig, "### `saetool report` flags"), (NeuronpediaConfig, "### `saetool export neuronpedia` flags"),
            (SparsifyConfig, "### `saetool export sparsify` flags")]


def update_readme_flags(path: str = "README.md") -> None:
    """Rewrite the flag table under each heading of `readme_tables()` in `path`."""
    readme = pathlib.Path(path)
    text = readme.read_text()
    for cls, heading in readme_tables():
        start = text.index("| flag | default | meaning |", text.index(heading))
        end = text.index("\n\n", start)
        text = text[:start] + markdown_flags(cls) + text[end:]
    readme.write_text(text)


if __name__ == "__main__":  # python -m saetool.config [README.md]
    update_readme_flags(*sys.argv[1:2])
