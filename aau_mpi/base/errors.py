"""The one exception type for bad input.

A UserError carries a one-line message that names the problem and the fix.
Entry points print it (on every rank) without a traceback and exit non-zero;
under MPI they then abort the whole job so that no rank is left waiting.
"""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: config, topology, data path, checkpoint."""


@contextmanager
def section(name):
    """Prefix a component's UserError with its config section, unless it names it."""
    try:
        yield
    except UserError as err:
        message = str(err)
        raise UserError(message if message.startswith(name) else f"{name}: {message}") from None


def exit_status(main, argv=None):
    """A one-process command's exit status: main(argv)'s return (None is 0), or, on a
    UserError, its message as one line on stderr and 2 (the MPI trainer, whose
    error must end every rank, has its own: aau_mpi.train)."""
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
