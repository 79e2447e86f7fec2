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
    from saetool.sweep import load_sweep_config, run_sweep

    if flags.get("config"):
        flags = {**load_sweep_config(flags["config"]), **flags}
    run_sweep(build(SweepConfig, flags))


def report(output_dir=None, **flags):
    from saetool.report import ReportConfig, run_report

    if output_dir is not None:
        flags["output_dir"] = output_dir
    run_report(build(ReportConfig, flags))


def _report_help() -> str:
    from saetool.report import report_help

    return report_help()


generate.__doc__ = "Record activations into a Zarr store.\n\nFlags:\n" + help_text(GenerateConfig)
sweep.__doc__ = "Train an ensemble sweep of SAEs on a store.\n\nFlags:\n" + help_text(SweepConfig)
report.__doc__ = ("Evaluate a finished sweep (held-out metrics, spliced CE/KL, densities) and write OUTPUT_DIR/report/"
                  "index.html.\n\nUsage: saetool report OUTPUT_DIR [flags]\n\nFlags:\n" + _report_help())


def run_cli(fn, argv: list[str] | None = None, name: str = "saetool") -> None:
    """Run a Fire command (or a dict of commands). `--help` prints the command's flags (from the config
    dataclasses) and exits 0; ValueError (bad input) becomes one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        target = fn
        if isinstance(fn, dict):
            command = next((a for a in argv if a in fn), None)
            target = fn.get(command)
            if target is None:
                print(f"usage: {name} {{{','.join(fn)}}} [--flag value ...]; {name} COMMAND --help lists the flags")
                sys.exit(0)
        print(target.__doc__)
        sys.exit(0)
    try:
        fire.Fire(fn, command=argv, name=name)
    except ValueError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; rerun the same command with --resume True to continue a sweep from its last "
              "checkpoint (--checkpoint_every), or rerun `generate` as is (it resumes by itself)", file=sys.stderr)
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    run_cli({"generate": generate, "sweep": sweep, "report": report}, argv)


if __name__ == "__main__":
    main()
