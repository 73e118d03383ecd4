"""A job config from a YAML file plus command-line overrides, validated once.

load_config (a file) and config_from_dict (a mapping) build the sections of
aau_mpi.training.config; this module is the one place that validates them.

An override `section.key=value` (value read as YAML) edits the raw mapping
before validation, so `policy.name=dpsgd` re-reads the flat parameters: one
that belongs to another policy (aau's tau) is dropped with a note in
Config.warnings; one that belongs to no policy is an error.

Numbers: ints are accepted where floats are expected, and numeric strings are
converted, because PyYAML reads YAML 1.1, where `1e-3` (no dot) is a string.
Integer fields accept integral values written as floats (2.0, "1e6" for
budget.samples) and reject others (2.5). Booleans are never numbers.

Component parameters are type-checked against the factory's default (an int
default wants an int, a tuple default a list, ...); their ranges are checked
by the component itself when it is built. Relative paths (topology.file,
output.dir) start at the current directory.
"""

import copy
import inspect
import math
import numbers
import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from aau_mpi.algorithms.learning_rate import LR_SCALINGS
from aau_mpi.base import checks
from aau_mpi.base.errors import UserError
from aau_mpi.base.registry import closest
from aau_mpi.base.settings import DEVICES, ON_RANK_LOSS, OVERLAP_MODES, WATCHDOG_ACTIONS
from aau_mpi.training.config import (DATASET, MODEL, PARTITION, POLICY, SCHEDULE, STRAGGLER,
                                     TOPOLOGY, BudgetConfig, CheckpointConfig, Component, Config,
                                     DataConfig, EmulateConfig, EvalConfig, FaultsConfig, MailboxConfig,
                                     OptimConfig, OutputConfig, TopologyConfig, WatchdogConfig)


# What to write for a required component parameter; the default is <value>.
REQUIRED_HINTS = {("mnist", "root"): "<folder with the IDX files>",
                  ("cifar10", "root"): "<folder with the CIFAR-10 python batches>",
                  ("hdf5", "path"): "<HDF5 file with X and y>"}


# ---------------------------------------------------------- scalar fields

def _to_float(value):
    # Strings too: "1e-3" is a string to YAML 1.1.
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise ValueError
    number = float(value)
    if not math.isfinite(number):
        raise ValueError
    return number


def _to_int(value):
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    number = _to_float(value)
    if not number.is_integer():
        raise ValueError
    return int(number)


def _of_type(*types):
    def convert(value):
        if not isinstance(value, types):
            raise ValueError
        return value
    return convert


def _to_path(value):
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError
    return os.fspath(value)


# kind -> (converter that raises ValueError or OverflowError, what the field wants)
CONVERTERS = {
    "float": (_to_float, "a number"),
    "int": (_to_int, "an integer"),
    "bool": (_of_type(bool), "true or false"),
    "str": (_of_type(str), "a string"),
    "path": (_to_path, "a path"),
    "list": (lambda value: list(_of_type(list, tuple)(value)), "a list like [1, 2]"),
    "any": (lambda value: value, "anything"),
}


@dataclass(frozen=True)
class _Field:
    kind: str
    check: object = None     # bounds for aau_mpi.base.checks (a dict), or the allowed strings (a tuple)
    optional: bool = False   # None (null) allowed


# Bounds in aau_mpi.base.checks' terms (the one set of value checks).
POSITIVE = {"above": 0}
NON_NEGATIVE = {"minimum": 0}
AT_LEAST_ONE = {"minimum": 1}
FRACTION = {"minimum": 0, "below": 1}
UP_TO_ONE = {"above": 0, "maximum": 1}


def _optional(kind, check):
    return _Field(kind, check, optional=True)


TOP_FIELDS = {"name": _optional("str", None),
              "seed": _Field("int", {"minimum": 0, "maximum": 2 ** 32 - 1}),
              "device": _Field("str", DEVICES)}
DATA_FIELDS = {"batch_size": _Field("int", AT_LEAST_ONE),
               "eval_batch_size": _Field("int", AT_LEAST_ONE)}
OPTIM_FIELDS = {"lr": _Field("float", POSITIVE),
                "momentum": _Field("float", FRACTION),
                "weight_decay": _Field("float", NON_NEGATIVE),
                "nesterov": _Field("bool"),
                "warmup": _Field("float", FRACTION),
                "scale_lr": _Field("str", LR_SCALINGS),
                "reference_batch": _optional("int", AT_LEAST_ONE),
                "clip_grad_norm": _optional("float", POSITIVE)}
BUDGET_FIELDS = {"epochs": _optional("float", POSITIVE),
                 "samples": _optional("int", POSITIVE),
                 "seconds": _optional("float", POSITIVE)}
# Sections with no cross-field rules: read field by field.
PLAIN_SECTIONS = {
    "eval": (EvalConfig, {"every_seconds": _optional("float", POSITIVE),
                          "every_epochs": _optional("float", POSITIVE),
                          "max_samples": _optional("int", AT_LEAST_ONE),
                          "target_accuracy": _optional("float", UP_TO_ONE),
                          "rank_models": _Field("bool")}),
    "emulate": (EmulateConfig, {"step_seconds": _optional("float", POSITIVE),
                                "jitter": _Field("float", FRACTION)}),
    "checkpoint": (CheckpointConfig, {"enabled": _Field("bool"),
                                      "every_seconds": _optional("float", POSITIVE),
                                      "every_iterations": _optional("int", AT_LEAST_ONE),
                                      "keep": _Field("int", AT_LEAST_ONE)}),
    "watchdog": (WatchdogConfig, {"seconds": _optional("float", POSITIVE),
                                  "action": _Field("str", WATCHDOG_ACTIONS)}),
    "mailbox": (MailboxConfig, {"checksum": _Field("bool"),
                                "overlap": _Field("str", OVERLAP_MODES)}),
    "faults": (FaultsConfig, {"on_rank_loss": _Field("str", ON_RANK_LOSS)}),
    "output": (OutputConfig, {"dir": _Field("path"),
                              "trace": _Field("bool"),
                              "progress": _Field("bool")}),
}


def _param_field(param):
    """The field a component parameter wants, judged by its default."""
    for types, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"),
                        ((list, tuple), "list")):
        if isinstance(param.default, types):
            return _Field(kind)
    return _Field("any")  # default None, or required


def _params(kind, name):
    """{parameter name: inspect.Parameter} that component `name` takes from the config."""
    signature = inspect.signature(kind.registry.get(name)).parameters
    return {key: signature[key] for key in kind.registry.params(name)[kind.skip:]}


def _show(value):
    """repr(value) for a one-line message, cut short when long; 1.0 shows as 1."""
    text = f"{value:.10g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _join(path, key):
    return f"{path}.{key}" if path else str(key)


# ------------------------------------------------------------------ reader

class _Reader:
    """Validates one raw mapping; blames the command line for keys it set."""

    def __init__(self, source, overridden):
        self.source = source
        self.overridden = overridden
        self.warnings = []

    def fail(self, path, message):
        # A path counts as set on the command line when an override set it,
        # a section holding it, or something inside it.
        touched = any(key == path or key.startswith(path + ".") or path.startswith(key + ".")
                      for key in self.overridden)
        return UserError(f"{'command line' if touched else self.source}: {message}")

    def mapping(self, raw, path):
        if raw is None:  # an empty section (`policy:`) means all defaults
            return {}
        if not isinstance(raw, dict):
            raise self.fail(path, f"{path} must be a mapping like {path}: {{key: value}}, "
                                  f"got {_show(raw)}")
        return raw

    def reject_unknown(self, raw, path, known, owner=None):
        """UserError for the first key of `raw` not in `known`; `owner` names who takes them."""
        for key in raw:
            if key not in known:
                hint = closest(str(key), known)
                suggestion = f"did you mean {_join(path, hint)!r}? " if hint else ""
                raise self.fail(_join(path, key), f"unknown key {_join(path, key)!r}: {suggestion}"
                                f"({owner or path or 'the top level'} takes: {', '.join(known)})")

    def value(self, value, path, spec):
        if value is None and spec.optional:
            return None
        convert, wanted = CONVERTERS[spec.kind]
        try:
            value = convert(value)
        except (ValueError, OverflowError):
            wanted += " or null" if spec.optional else ""
            raise self.fail(path, f"{path} must be {wanted}, got {_show(value)}") from None
        try:
            if isinstance(spec.check, tuple):
                checks.choice(path, value, spec.check)
            elif spec.check is not None:
                check = checks.integer if spec.kind == "int" else checks.number
                value = check(path, value, **spec.check)
        except UserError as err:
            raise self.fail(path, str(err)) from None
        return value

    def fields(self, raw, path, specs):
        """The keys of `specs` that `raw` sets, converted (the dataclass supplies the rest)."""
        return {key: self.value(raw[key], _join(path, key), spec)
                for key, spec in specs.items() if key in raw}

    def plain(self, raw, path, cls, specs):
        raw = self.mapping(raw, path)
        self.reject_unknown(raw, path, list(specs))
        return cls(**self.fields(raw, path, specs))

    def component(self, raw, path, kind, own=()):
        """Component from a flat section; the section's own keys are left to the caller."""
        raw = self.mapping(raw, path)
        registry, name = kind.registry, raw.get("name")
        if name is None:
            name = kind.default
        if not isinstance(name, str):
            raise self.fail(f"{path}.name", f"{path}.name must be a string, got {_show(name)} "
                                            f"(choose from: {', '.join(registry.names())})")
        try:
            accepted = _params(kind, name)
        except UserError as err:
            raise self.fail(f"{path}.name", f"{path}.name: {err}") from None
        params = {}
        for key, value in raw.items():
            if key == "name" or key in own:
                continue
            if key in accepted:
                params[key] = self.value(value, f"{path}.{key}", _param_field(accepted[key]))
                continue
            owners = [other for other in registry.names() if key in _params(kind, other)]
            if not owners:  # a typo, not another component's parameter: raises
                self.reject_unknown({key: value}, path, ["name", *own, *accepted],
                                    owner=f"{path} {name!r}")
            owned_by = ", ".join(map(repr, owners))
            self.warnings.append(f"{path}.{key} is ignored: {registry.kind} {name!r} takes no "
                                 f"parameter {key!r} (it belongs to {owned_by})")
        for key, param in accepted.items():
            if param.default is param.empty and key not in params:
                hint = REQUIRED_HINTS.get((name, key), "<value>")
                # Blamed on the name: choosing this component made the parameter required.
                raise self.fail(f"{path}.name", f"{path}.{key} is required for {registry.kind} "
                                                f"{name!r}: set {path}.{key}={hint}")
        return Component(name, params)

    def topology(self, raw):
        raw = self.mapping(raw, "topology")
        if raw.get("file") is None:
            generator = self.component(raw, "topology", TOPOLOGY, own=("file",))
            return TopologyConfig(generator.name, None, generator.params)
        file = self.value(raw["file"], "topology.file", _Field("path"))
        if raw.get("name") is not None:
            raise self.fail("topology", f"topology has both name {_show(raw['name'])} and file "
                                        f"{_show(file)}: give one (on the command line, replace "
                                        "the whole section: topology={file: x.yaml} or "
                                        "topology={name: ring})")
        for key in raw:
            if key not in ("file", "name"):
                where = _join("topology", key)
                raise self.fail(where, f"{where!r} does not go with topology.file "
                                       "(the file sets the whole topology): remove it")
        if not Path(file).is_file():
            raise self.fail("topology.file",
                            f"topology.file {_show(file)} is not a file (relative paths start "
                            "at the current directory): check the path")
        return TopologyConfig(None, file, {})

    def data(self, raw):
        raw = self.mapping(raw, "data")
        dataset = self.component(raw, "data", DATASET, own=("batch_size", "partition",
                                                             "eval_batch_size"))
        partition = self.component(raw.get("partition"), "data.partition", PARTITION)
        return DataConfig(dataset.name, dataset.params, partition=partition,
                          **self.fields(raw, "data", DATA_FIELDS))

    def optim(self, raw):
        raw = self.mapping(raw, "optim")
        self.reject_unknown(raw, "optim", [f.name for f in fields(OptimConfig)])
        schedule = self.component(raw.get("schedule"), "optim.schedule", SCHEDULE)
        optim = OptimConfig(schedule=schedule, **self.fields(raw, "optim", OPTIM_FIELDS))
        if optim.nesterov and optim.momentum == 0:
            raise self.fail("optim.nesterov", "optim.nesterov needs optim.momentum > 0: "
                                              "set optim.momentum=0.9 or optim.nesterov=false")
        try:
            optim.learning_rate()  # range checks of the schedule parameters
        except UserError as err:
            raise self.fail("optim.schedule", str(err)) from None
        return optim

    def budget(self, raw):
        budget = self.plain(raw, "budget", BudgetConfig, BUDGET_FIELDS)
        if budget.epochs is not None and budget.samples is not None:
            raise self.fail("budget", "budget.epochs and budget.samples are both set: keep one "
                                      "(both count the samples that all ranks see together)")
        if budget.epochs is None and budget.samples is None and budget.seconds is None:
            raise self.fail("budget",
                            "budget: set budget.epochs, budget.samples or budget.seconds")
        return budget

    def config(self, raw):
        known = [f.name for f in fields(Config) if f.compare]
        self.reject_unknown(raw, "", known)
        plain = {name: self.plain(raw.get(name), name, cls, specs)
                 for name, (cls, specs) in PLAIN_SECTIONS.items()}
        return Config(policy=self.component(raw.get("policy"), "policy", POLICY),
                      topology=self.topology(raw.get("topology")),
                      data=self.data(raw.get("data")),
                      model=self.component(raw.get("model"), "model", MODEL),
                      optim=self.optim(raw.get("optim")),
                      budget=self.budget(raw.get("budget")),
                      stragglers=self.component(raw.get("stragglers"), "stragglers", STRAGGLER),
                      **plain, **self.fields(raw, "", TOP_FIELDS))


# ------------------------------------------------------------------ entry points

def _parse_yaml(text, where, fix):
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(err.problem or err.context or "invalid syntax").split())
        raise UserError(f"{where}: not valid YAML ({at}{problem}): {fix}") from None
    except Exception as err:  # safe_load raises plain ValueError etc. for tags like `!!float x`
        problem = " ".join(str(err).split())
        raise UserError(f"{where}: not valid YAML ({problem}): {fix}") from None


def _parse_override(arg):
    key, equals, text = str(arg).partition("=")
    key = key.strip()
    if not equals or not key or not all(key.split(".")):
        raise UserError(f"command line: bad override {_show(arg)}: write section.key=value, "
                        "e.g. optim.lr=0.05")
    return key, _parse_yaml(text, f"command line: {key}", "quote or fix the value")


def _apply_overrides(raw, overrides):
    """A copy of `raw` with every `key.path=value` set, and the keys set."""
    raw, keys = copy.deepcopy(raw), []
    for arg in overrides:
        key, value = _parse_override(arg)
        parts, node = key.split("."), raw
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                prefix = ".".join(parts[:depth + 1])
                raise UserError(f"command line: cannot set {key!r}: {prefix!r} is "
                                f"{_show(node[part])}, not a section")
            node = node[part]
        node[parts[-1]] = value
        keys.append(key)
    return raw, keys


def config_from_dict(raw, source="<dict>", overrides=()):
    """The validated Config for a raw mapping (as parsed from YAML) plus overrides.

    `source` names the mapping's origin in error messages (e.g. its file path).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections like "
                        f"'optim: {{lr: 0.05}}', got {type(raw).__name__}")
    raw, overridden = _apply_overrides(raw, overrides)
    reader = _Reader(source, overridden)
    config = reader.config(raw)
    config.warnings = reader.warnings
    return config


def load_config(path, overrides=()):
    """The validated Config from YAML file `path` (None: all defaults) plus overrides."""
    if path is None:
        return config_from_dict({}, "command line", overrides)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}: check the --config path "
                        "(relative paths start at the current directory)") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or "not a text file"
        raise UserError(f"cannot read config file {path} ({reason}): "
                        "check the --config path") from None
    return config_from_dict(_parse_yaml(text, str(path), "fix the syntax"), str(path), overrides)
