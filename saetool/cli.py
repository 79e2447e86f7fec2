"""The `saetool` command line (Fire): `saetool generate ...`, `saetool sweep ...`.

Every flag is a field of saetool.config.GenerateConfig / SweepConfig; `saetool generate --help` lists them.
Bad input exits with status 2 and one line on stderr: `saetool: error: <reason>`.
"""

from __future__ import annotations

import sys

import fire

from saetool.config import GenerateConfig, SweepConfig, build, help_text


def generate(**flags):
    from saetool.generate import run_generate

    run_generate(build(GenerateConfig, flags))


def sweep(**flags):
    from saetool.sweep import run_sweep

    run_sweep(build(SweepConfig, flags))


generate.__doc__ = "Record activations into a Zarr store.\n\nFlags:\n" + help_text(GenerateConfig)
sweep.__doc__ = "Train an ensemble sweep of SAEs on a store.\n\nFlags:\n" + help_text(SweepConfig)


def run_cli(fn, argv: list[str] | None = None, name: str = "saetool") -> None:
    """Run a Fire command, turning ValueError (bad input) into one line on stderr and exit status 2."""
    try:
        fire.Fire(fn, command=argv, name=name)
    except ValueError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    run_cli({"generate": generate, "sweep": sweep}, argv)


if __name__ == "__main__":
    main()
