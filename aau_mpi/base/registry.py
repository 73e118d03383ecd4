"""Components registered by name (topologies, policies, models, datasets, stragglers).

Config files name components by string; a Registry maps the string to the
factory and turns a typo into a one-line UserError that suggests the closest
registered name.
"""

import difflib
import inspect

from aau_mpi.base.errors import UserError


def closest(name, candidates):
    """The candidate most similar to `name`, or None when nothing is close."""
    matches = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name_message(kind, name, candidates):
    """'unknown policy 'aua': did you mean 'aau'? (choose from: ...)'."""
    hint = closest(name, candidates)
    suggestion = f"did you mean {hint!r}? " if hint else ""
    return (f"unknown {kind} {name!r}: {suggestion}"
            f"(choose from: {', '.join(sorted(candidates))})")


class Registry:
    """A name -> factory table for one kind of component."""

    def __init__(self, kind):
        self.kind = kind
        self._entries = {}

    def register(self, name):
        """Decorator: register the decorated factory under `name`."""
        def add(factory):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = factory
            return factory
        return add

    def get(self, name):
        if name not in self._entries:
            raise UserError(unknown_name_message(self.kind, name, self._entries))
        return self._entries[name]

    def params(self, name):
        """Keyword parameters the factory `name` takes (after `fixed` leading ones)."""
        return [p.name for p in inspect.signature(self.get(name)).parameters.values()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def build(self, name, params=None, *args):
        """factory(*args, **params), with unknown or missing params as a UserError."""
        factory = self.get(name)
        params = dict(params or {})
        accepted = self.params(name)[len(args):]
        for key in params:
            if key not in accepted:
                hint = closest(key, accepted)
                suggestion = f"did you mean {hint!r}? " if hint else ""
                raise UserError(f"unknown parameter {key!r} for {self.kind} {name!r}: "
                                f"{suggestion}(it takes: {', '.join(accepted) or 'no parameters'})")
        try:
            inspect.signature(factory).bind(*args, **params)
        except TypeError as err:
            raise UserError(f"bad parameters for {self.kind} {name!r}: {err} "
                            f"(it takes: {', '.join(accepted) or 'no parameters'})") from None
        return factory(*args, **params)

    def names(self):
        return sorted(self._entries)
