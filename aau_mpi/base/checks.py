"""The one set of value checks for components' parameters (one wording, one set of rules).

Each check returns the value converted (int, float, bool) or raises a one-line
UserError that names the field, what it must be and what it got, e.g.
"policy.tau must be an integer >= 1, got 0". Booleans are never numbers; an
integral float (2.0) is an integer; NaN and infinity are never numbers.
is_integer only answers, for callers that word their own error.
"""

import math
import numbers

from aau_mpi.base.errors import UserError


def _show(value):
    text = f"{value:.10g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounds(minimum, maximum, above, below):
    def show(bound):
        return str(bound) if isinstance(bound, int) else f"{bound:g}"
    parts = [f"{sign} {show(bound)}" for sign, bound in
             ((">=", minimum), (">", above), ("<=", maximum), ("<", below)) if bound is not None]
    return " and ".join(parts)


def _in_range(value, minimum, maximum, above, below):
    return ((minimum is None or value >= minimum) and (maximum is None or value <= maximum)
            and (above is None or value > above) and (below is None or value < below))


def is_integer(value):
    """Whether value is an integer type and not a bool (YAML turns `true` into a bool,
    and bool is an int subclass); unlike integer(), 2.0 is not one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def number(field, value, minimum=None, maximum=None, *, above=None, below=None):
    """A finite real number within the bounds (inclusive minimum/maximum, exclusive above/below)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        try:
            value = float(value)
        except OverflowError:
            ok = False
    ok = ok and math.isfinite(value) and _in_range(value, minimum, maximum, above, below)
    if not ok:
        bounds = _bounds(minimum, maximum, above, below)
        raise UserError(f"{field} must be a number{' ' + bounds if bounds else ''}, "
                        f"got {_show(value)}")
    return value


def integer(field, value, minimum=None, maximum=None, *, above=None, below=None):
    """An integer (an integral float counts) within the bounds."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and not isinstance(value, numbers.Integral):
        ok = math.isfinite(value) and float(value).is_integer()
    ok = ok and _in_range(int(value), minimum, maximum, above, below)
    if not ok:
        bounds = _bounds(minimum, maximum, above, below)
        raise UserError(f"{field} must be an integer{' ' + bounds if bounds else ''}, "
                        f"got {_show(value)}")
    return int(value)


def boolean(field, value):
    if not isinstance(value, bool):
        raise UserError(f"{field} must be true or false, got {_show(value)}")
    return value


def choice(field, value, choices):
    if value not in choices:
        raise UserError(f"{field} must be one of {', '.join(map(str, choices))}, "
                        f"got {_show(value)}")
    return value
