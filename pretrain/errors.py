"""Errors a user can fix, and the one way every program reports them: `error: ...` on stderr and exit status 2.

Library code raises a subclass of UserError whose message names the culprit (a key, a file and line, a setting)
and what was expected or how to go on. A program's entry point is `errors.run(main)`, which turns such an error
into that one line. Anything else is a bug in this code and keeps its traceback.
"""

import os
import signal
import sys
from collections.abc import Callable


class UserError(Exception):
    """Something the user can fix: a config key, a file, a setting, a missing download. The message says which."""


class MissingPackage(UserError, ImportError):
    """An optional package a feature needs is not installed; the message says what to pip install."""


class HelpRequested(Exception):
    """--help was given: the exception's text is the help; the program prints it and exits 0."""


def missing_package(feature: str, package: str) -> MissingPackage:
    return MissingPackage(f"{feature} needs the {package} package: pip install {package}")


def is_reporting_rank() -> bool:
    """Under torchrun every rank parses the same arguments and reaches the same startup errors: rank 0 alone
    reports those, so a job prints one line, not one per rank."""
    return os.environ.get("RANK", "0") == "0"


def report(error: UserError) -> None:
    """One line on stderr, from rank 0 only unless the error is this rank's alone (error.every_rank False: a shard
    that one rank reads, say)."""
    if is_reporting_rank() or not getattr(error, "every_rank", True):
        print(f"error: {error}", file=sys.stderr, flush=True)


def rank_local(error: UserError) -> UserError:
    """Mark an error that only this rank meets, so that this rank reports it (report prints rank 0's otherwise)."""
    error.every_rank = False
    return error


def _is_lost_rank(error: BaseException) -> bool:
    """A collective that failed because another rank stopped (torch.distributed's errors; torch is only looked up
    if the program has imported it)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and isinstance(error, getattr(dist, "DistError", ()))


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a program as Ctrl-C does (training's loop handles both itself)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Call main(argv) (default: the command line) and exit: 0, or main's status; 2 with one line for a
    UserError; 0 after printing the help for --help; 130 with one line for Ctrl-C or SIGTERM that main did not
    handle (training handles them in its loop, by saving). Under torchrun, a collective that fails because another
    rank stopped is one line from rank 0 (that rank's own output, or torchrun's summary, says why), none from the
    rest."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        status = main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        if is_reporting_rank():
            print("stopped by a signal (Ctrl-C or SIGTERM); nothing was saved", file=sys.stderr, flush=True)
        status = 130
    except HelpRequested as help_text:
        print(help_text)
        status = 0
    except UserError as e:
        report(e)
        status = 2
    except Exception as e:
        if not _is_lost_rank(e):
            raise
        if is_reporting_rank():
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: another rank stopped or was killed, and a collective failed ({first_line}); that rank's "
                  "output, or torchrun's summary, says why", file=sys.stderr, flush=True)
        status = 1
    sys.exit(status or 0)
