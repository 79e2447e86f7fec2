"""The `saetool` command line (Fire): `saetool generate ...`, `saetool sweep ...`.

Every flag is a field of saetool.config.GenerateConfig / SweepConfig; `saetool generate --help` lists them.
Bad input exits with status 2 and one line on stderr: `saetool: error: <reason>`.
"""

from __future__ import annotations

import sys

import fire

from saetool.config import (
    GenerateConfig,
    NeuronpediaConfig,
    ReportConfig,
    SparsifyConfig,
    SweepConfig,
    build,
    help_text,
)
from saetool.export import export_neuronpedia, export_sparsify
from saetool.generate import run_generate
from saetool.report import run_report
from saetool.sweep import run_sweep, with_config


def generate(**flags):
    run_generate(build(GenerateConfig, flags))


def sweep(**flags):
    run_sweep(build(SweepConfig, with_config(flags)))


def report(output_dir=None, **flags):
    if output_dir is not None:
        flags["output_dir"] = output_dir
    run_report(build(ReportConfig, flags))


EXPORTS = {"neuronpedia": NeuronpediaConfig, "sparsify": SparsifyConfig}


def export(kind=None, output_dir=None, **flags):
    if kind not in EXPORTS:
        raise ValueError(f"saetool export needs a format: {' or '.join(EXPORTS)} (saetool export FORMAT OUTPUT_DIR)")
    if output_dir is not None:
        flags["output_dir"] = output_dir
    run = {"neuronpedia": export_neuronpedia, "sparsify": export_sparsify}[kind]
    run(build(EXPORTS[kind], flags))


def _export_help() -> str:
    return "\n\n".join(f"saetool export {kind} OUTPUT_DIR:\n" + help_text(cls) for kind, cls in EXPORTS.items())


generate.__doc__ = "Record activations into a Zarr store.\n\nFlags:\n" + help_text(GenerateConfig)
sweep.__doc__ = "Train an ensemble sweep of SAEs on a store.\n\nFlags:\n" + help_text(SweepConfig)
report.__doc__ = ("Evaluate a finished sweep (held-out metrics, spliced CE/KL, densities) and write OUTPUT_DIR/report/"
                  "index.html.\n\nUsage: saetool report OUTPUT_DIR [flags]\n\nFlags:\n" + help_text(ReportConfig))


export.__doc__ = ("Export a finished sweep: `neuronpedia` writes Neuronpedia's bulk-import layout and SAELens' "
                  "sparsity.safetensors beside each member; `sparsify` writes sparsify's cfg.json + sae.safetensors per "
                  "hookpoint.\n\nUsage: saetool export FORMAT OUTPUT_DIR [flags]\n\n" + _export_help())


POSITIONALS = {"report": 1, "export": 2}  # commands that take positional arguments (saetool report OUTPUT_DIR)


def _refuse_stray_arguments(fn, argv: list[str]) -> None:
    """ValueError for an argument that is neither the command, a --flag, a flag's value, nor an allowed positional.

    Fire would otherwise apply it to the command's return value, i.e. only after the work is done
    (`--l1_values 0.001 0.01` or `--layers 3 5`: the second value). `--flag value` consumes the next argument
    unless it starts with "--"; `--flag=value` consumes none."""
    args = list(argv)
    command = args.pop(0) if isinstance(fn, dict) and args and args[0] in fn else None
    allowed, i, flag = POSITIONALS.get(command, 0), 0, None
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            flag = None if "=" in a else a
        elif flag is not None:
            flag = None  # the value of the preceding flag
        elif allowed:
            allowed -= 1
        else:
            where = f" (after {' '.join(args[max(0, i - 2) : i])})" if i else ""
            raise ValueError(f"unexpected argument {a!r}{where}: pass one value per flag (lists comma-separated, "
                             "e.g. --l1_values 0.001,0.01)")
        i += 1


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
        _refuse_stray_arguments(fn, argv)
        fire.Fire(fn, command=argv, name=name)
    except ValueError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; rerun the same command with --resume True to continue a sweep from its last "
              "checkpoint (--checkpoint_every), or rerun `generate` as is (it resumes by itself)", file=sys.stderr)
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    run_cli({"generate": generate, "sweep": sweep, "report": report, "export": export}, argv)


if __name__ == "__main__":
    main()
