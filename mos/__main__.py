"""Command line of mos: `python -m mos <command> [options]`.

Each command is a module with `add_arguments(parser)` and `run(args) -> int`; add one by adding a
row to COMMANDS. The modules must import cheaply (heavy imports such as torch go inside `run`), so
`python -m mos --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module that implements it, one-line help)
COMMANDS = {
    "demo": ("mos.real_demo", "fine-tune SmolLM2-135M-Instruct, a real pretrained LLM, with MoS on "
                              "CPU and compare it with PEFT LoRA (the main demo)"),
    "toy-demo": ("mos.demo", "the toy demo: fine-tune a small random-init Llama with MoS and with LoRA "
                             "on CPython's own sources and compare them"),
    "serve-demo": ("mos.serve_demo", "serve several adapters of one base model in one mixed batch "
                                     "and compare with single-adapter runs and LoRA's memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mos",
        description="mos: MoS (Mixture of Shards) adapters, a parameter-efficient LoRA.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or help_text).strip()
        cmd = sub.add_parser(name, help=help_text, description=doc,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def version_line() -> str:
    """`mos --version`: the version and how the extension was built, without importing torch."""
    import mos

    info = mos.build_info()
    backends = "CPU (" + str(info.get("blas", "BLAS")) + ")" + (" + CUDA" if info.get("cuda") else "")
    return f"mos {mos.__version__} ({backends}) from {mos.__file__.rsplit('/', 1)[0]}"


def main(argv=None) -> int:
    from mos._extras import missing_extra_error

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ModuleNotFoundError as error:
        hint = missing_extra_error(error, f"`mos {args.command}`")
        if hint is None:
            raise
        print(f"error: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
