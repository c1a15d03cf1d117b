"""`qwentune ARGV` run in this process, for tests of refusals: no interpreter start-up (~3 s a call) per case."""

from __future__ import annotations

import contextlib
import io

from qwentune import cli


def run_main(argv: list[str]) -> tuple[int, str]:
    """`qwentune ARGV` in this process: (exit code, stderr). Any exception but SystemExit propagates: a traceback."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()
