"""The ``censusvi`` command line: ``parser`` reads the arguments, ``commands`` calls the Python
API (``censusvi.api``) with them, and ``main`` is the one loop around both.

Errors the user can fix (bad input, bad settings, an unreachable registry, a missing extra) print
one ``censusvi: error: ...`` line and exit 2; anything else keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

from censusvi.atomic import check_folder, check_output, local_output
from censusvi.cli import commands
from censusvi.cli.parser import build_parser
from censusvi.extras import MissingExtra, needs_extras
from censusvi.registry.mlflow_store import RegistryUnreachable
from censusvi.registry.versions import PromotionRefused

__all__ = ["USER_ERRORS", "build_parser", "commands", "main"]

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    OSError,  # a file or folder the OS refuses (permissions, space, a file where a folder was)
    KeyError,
    FloatingPointError,
    TimeoutError,
    PromotionRefused,
    RegistryUnreachable,
    MissingExtra,  # an extra the command needs is not installed: which one, and the pip line
)


def _check_outputs(args) -> None:
    """Before any work: each output as a local path (``file://`` URIs read as theirs), and what
    --out (and the command's other outputs) may replace."""
    inputs = [getattr(args, k) for k in args.out_inputs]
    check_output(args.out, args.out_kind, args.overwrite, inputs)
    for flag, kind in getattr(args, "extra_outs", ()):
        if getattr(args, flag) is not None:  # given empty: refused, not skipped
            name = "--" + flag.replace("_", "-")
            setattr(args, flag, local_output(getattr(args, flag), name))
            check_output(getattr(args, flag), kind, args.overwrite, [*inputs, args.out], name)
    for flag in getattr(args, "extra_folders", ()):
        if getattr(args, flag) is not None:
            name = "--" + flag.replace("_", "-")
            setattr(args, flag, local_output(getattr(args, flag), name))
            check_folder(getattr(args, flag), name, [*inputs, args.out])


@contextmanager
def stopped_cleanly():
    """SIGTERM (what Kubernetes, Slurm and `kill` send) raises KeyboardInterrupt in the command,
    as Ctrl-C does, so its outputs' temporaries are removed on the way out (the default handler
    ends the process where it stands). Restored afterwards; a no-op off the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone; if so, stdout is pointed at /dev/null so that the
    interpreter's last flush does not print a traceback of its own."""
    import os
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(event & select.POLLERR for _, event in poll.poll(0))  # a pipe without reader
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no stdout file
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return gone


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from censusvi import progress

        progress.QUIET = True
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # faiss logs each loader it tries (AVX512, AVX2, ...) at INFO
        logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        if getattr(args, "out", None) is not None:  # ingest's too, which checks its own --out
            args.out = local_output(args.out)
        if getattr(args, "out_kind", None):
            _check_outputs(args)
        command = " ".join(filter(None, (args.command, getattr(args, "models_command", None))))
        with needs_extras(f"censusvi {command}"), stopped_cleanly():
            return args.fn(args)
    except KeyboardInterrupt:
        print("censusvi: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return 141  # `censusvi info m | head`: the reader left, as for any Unix filter
    except Exception as e:
        # The registry's own errors (no such version, bad URI; RestException from a server) are
        # the user's to fix too: matched by name, so that mlflow is imported only when used.
        mlflow_error = any(c.__name__ == "MlflowException" for c in type(e).__mro__)
        if args.verbose or not (isinstance(e, USER_ERRORS) or mlflow_error):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"censusvi: error: {' '.join(str(msg).split())}", file=sys.stderr)  # one line
        return 2
