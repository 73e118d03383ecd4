"""The one exception type for bad input.

A UserError carries a one-line message that names the problem and the fix.
Entry points print it (on every rank) without a traceback and exit non-zero;
under MPI they then abort the whole job so that no rank is left waiting.
"""


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
