"""The ``scmc`` command group and the console entry point :func:`run`."""

from __future__ import annotations

import sys

import click

import scmc

EXIT_CODES = """\
\b
Exit status: 0 success; 1 a user error (one message naming the file, line or flag and what to do);
2 a usage error (an unknown or bad flag); 70 an internal error (a bug in scmc: please report it).
Colour only on a terminal and never with NO_COLOR set.
\b
Shell completion (bash; zsh_source, fish_source likewise):
  eval "$(_SCMC_COMPLETE=bash_source scmc)"
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(scmc.__version__, prog_name="scmc")
def main() -> None:
    """scmc: compile YAML layer templates into standalone PyTorch packages.

    \b
    Example:
      scmc build cfg/models/ConvNeXtV2.yaml -p backbone=femto
      scmc inspect artifacts/convnextv2_femto
    """


def run(argv: list[str] | None = None) -> None:
    """The console entry point (`scmc`, `python -m scmc`): run the command, then leave at once.

    Tearing down an interpreter that has imported torch, timm and onnx (garbage-collecting
    every module's objects) costs 2-3 s of CPU on a 2-core machine, longer than compiling
    femto. Everything a command writes is closed and renamed into place before it returns,
    so after flushing the standard streams and the logging handlers nothing is left to do:
    ``os._exit`` skips the teardown and keeps the exit status ``sys.exit`` would have given.
    Tests call ``main`` through click's runner and are unaffected.
    """
    import logging
    import os

    try:
        main(args=argv, prog_name="scmc")
        status = 0
    except SystemExit as exc:
        if exc.code is None:
            status = 0
        elif isinstance(exc.code, int):
            status = exc.code
        else:  # sys.exit("message") prints the message and exits 1
            print(exc.code, file=sys.stderr)
            status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`scmc ... | head`) has nothing left to flush into
            pass
    os._exit(status)
