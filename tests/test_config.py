"""Job configuration: defaults, YAML round trip, overrides, and one-line errors."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aau_mpi.training.config import (BudgetConfig, Component, Config, DataConfig, OptimConfig,
                                     TopologyConfig)
from aau_mpi.training.config_loading import config_from_dict, load_config
from aau_mpi.base.errors import UserError

RING = str(Path(__file__).resolve().parents[1] / "topologies" / "ring.yaml")
BUDGET = ["budget.epochs=1"]

FULL = {
    "name": "demo",
    "seed": 7,
    "device": "cpu",
    "policy": {"name": "aau", "tau": 8, "gamma": 0.5},
    "topology": {"name": "random_regular", "degree": 4, "seed": 1},
    "data": {"name": "synthetic", "samples": 2000, "batch_size": 16,
             "partition": {"name": "dirichlet", "alpha": 0.3}, "eval_batch_size": 500},
    "model": {"name": "mlp", "hidden": [64, 32]},
    "optim": {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.0001, "nesterov": True,
              "schedule": {"name": "step", "milestones": [0.3, 0.6], "factor": 0.5},
              "warmup": 0.05, "scale_lr": "sqrt", "reference_batch": 64, "clip_grad_norm": 5.0},
    "budget": {"samples": 100000, "seconds": 600.0},
    "stragglers": {"name": "fixed", "ranks": [1, 2], "slowdown": 3.0},
    "emulate": {"step_seconds": 0.05, "jitter": 0.1},
    "eval": {"every_seconds": 5.0, "max_samples": 2000, "target_accuracy": 0.9,
             "rank_models": False},
    "checkpoint": {"enabled": False, "every_iterations": 100, "keep": 3},
    "watchdog": {"seconds": 30.0, "action": "warn"},
    "mailbox": {"checksum": True, "overlap": "inline"},
    "faults": {"on_rank_loss": "continue"},
    "output": {"dir": "out", "trace": True, "progress": False},
}


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error(raw=None, overrides=(), source="jobs/x.yaml"):
    """The one-line message of the UserError that this config raises."""
    with pytest.raises(UserError) as info:
        config_from_dict(raw if raw is not None else {"budget": {"epochs": 1}}, source, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ defaults

def test_defaults():
    config = load_config(None, BUDGET)
    assert config == Config(budget=BudgetConfig(epochs=1.0))
    assert config.policy == Component("aau", {})
    assert config.topology == TopologyConfig("ring", None, {})
    assert config.data == DataConfig("digits", {}, 32, Component("iid", {}), 1000)
    assert config.model == Component("mlp", {})
    assert config.optim == OptimConfig(0.05, 0.9, 0.0, False, Component("constant", {}), 0.0)
    assert config.stragglers == Component("none", {})
    assert (config.seed, config.device, config.name) == (0, "auto", None)
    assert config.checkpoint.every_seconds == 300.0 and config.checkpoint.keep == 2
    assert config.output.dir == "runs"
    assert config.warnings == []


def test_empty_sections_and_empty_file_mean_defaults(tmp_path):
    config = load_config(write(tmp_path, "policy:\nbudget: {seconds: 10}\n"))
    assert config.policy == Component("aau", {})
    assert load_config(write(tmp_path, ""), ["budget.seconds=5"]).budget.seconds == 5.0


def test_learning_rate_follows_the_optim_section():
    config = config_from_dict(FULL)
    lr = config.optim.learning_rate()
    assert lr(0.5) == pytest.approx(0.1 * 0.5)


# ------------------------------------------------------------------ round trip

def test_full_file_round_trip(tmp_path):
    path = write(tmp_path, yaml.safe_dump(FULL))
    config = load_config(path)
    assert config.policy == Component("aau", {"tau": 8, "gamma": 0.5})
    assert config.data.partition == Component("dirichlet", {"alpha": 0.3})
    assert config.optim.schedule.params == {"milestones": [0.3, 0.6], "factor": 0.5}
    assert config.to_dict() == FULL | {"topology": {"name": "random_regular", "file": None,
                                                    "degree": 4, "seed": 1},
                                       "budget": FULL["budget"] | {"epochs": None},
                                       "eval": FULL["eval"] | {"every_epochs": None},
                                       "checkpoint": FULL["checkpoint"] | {"every_seconds": 300.0}}
    assert config_from_dict(config.to_dict()) == config
    saved = write(tmp_path, config.to_yaml(), "resolved.yaml")
    assert load_config(saved) == config
    assert list(yaml.safe_load(config.to_yaml())) == list(FULL)  # schema order


def test_topology_file_round_trip():
    config = config_from_dict({"topology": {"file": RING}, "budget": {"epochs": 1}})
    assert config.topology == TopologyConfig(None, RING, {})
    assert config_from_dict(yaml.safe_load(config.to_yaml())) == config


# ------------------------------------------------------------------ overrides

def test_overrides_scalar_nested_list_and_new_keys(tmp_path):
    path = write(tmp_path, "optim: {lr: 0.1}\ndata: {partition: {name: dirichlet}}\n"
                           "budget: {epochs: 2}\n")
    config = load_config(path, ["optim.lr=0.05", "data.partition.alpha=0.5",
                                "model.hidden=[32, 16]", "policy.tau=8", "name=run1",
                                "checkpoint.every_seconds=null", "output.trace=true"])
    assert config.optim.lr == 0.05
    assert config.data.partition == Component("dirichlet", {"alpha": 0.5})
    assert config.model.params == {"hidden": [32, 16]}
    assert config.policy.params == {"tau": 8}
    assert config.name == "run1"
    assert config.checkpoint.every_seconds is None
    assert config.output.trace is True


def test_override_replaces_a_whole_section():
    config = config_from_dict(FULL, overrides=["topology={file: " + RING + "}"])
    assert config.topology == TopologyConfig(None, RING, {})


def test_override_leaves_the_raw_mapping_alone():
    raw = {"optim": {"lr": 0.1}, "budget": {"epochs": 1}}
    config_from_dict(raw, overrides=["optim.lr=0.2", "policy.tau=3"])
    assert raw == {"optim": {"lr": 0.1}, "budget": {"epochs": 1}}


def test_switching_component_drops_the_old_ones_params_with_a_warning(tmp_path):
    path = write(tmp_path, "policy: {name: aau, tau: 4, gamma: 0.5}\nbudget: {epochs: 1}\n")
    config = load_config(path, ["policy.name=dpsgd"])
    assert config.policy == Component("dpsgd", {})
    assert config.warnings == [
        "policy.tau is ignored: policy 'dpsgd' takes no parameter 'tau' (it belongs to 'aau')",
        "policy.gamma is ignored: policy 'dpsgd' takes no parameter 'gamma' (it belongs to 'aau')"]
    assert config_from_dict(config.to_dict()).warnings == []


def test_warning_lists_every_owner():
    config = config_from_dict({"topology": {"name": "ring", "seed": 3}, "budget": {"epochs": 1}})
    assert config.warnings == ["topology.seed is ignored: topology generator 'ring' takes no "
                               "parameter 'seed' (it belongs to 'erdos_renyi', 'random_regular')"]


# ------------------------------------------------------------------ numbers

def test_numeric_strings_and_integral_floats(tmp_path):
    path = write(tmp_path, "optim: {lr: 1e-3, weight_decay: 5e-4}\nbudget: {samples: 1e6}\n"
                           "policy: {gamma: 1e-1}\nseed: 3.0\n")
    config = load_config(path)
    assert config.optim.lr == 0.001 and config.optim.weight_decay == 0.0005
    assert config.budget.samples == 1_000_000 and isinstance(config.budget.samples, int)
    assert config.policy.params == {"gamma": 0.1}
    assert config.seed == 3 and isinstance(config.seed, int)


def test_ints_are_accepted_as_floats():
    config = config_from_dict({"optim": {"lr": 1}, "budget": {"seconds": 60},
                               "policy": {"gamma": 1}})
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    gamma = config.policy.params["gamma"]
    assert gamma == 1.0 and isinstance(gamma, float)


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lr=abc"], "optim.lr must be a number, got 'abc'"),
    (["optim.lr=true"], "optim.lr must be a number, got True"),
    (["seed=2.5"], "seed must be an integer, got 2.5"),
    (["budget.epochs=null", "budget.samples=many"], "budget.samples must be an integer or null"),
    (["optim.nesterov=1"], "optim.nesterov must be true or false, got 1"),
    (["output.dir=3"], "output.dir must be a path, got 3"),
    (["policy.tau=1.5"], "policy.tau must be an integer, got 1.5"),
    (["policy.rate_scaled=yes please"], "policy.rate_scaled must be true or false"),
    (["model.hidden=64"], "model.hidden must be a list like [1, 2], got 64"),
    (["stragglers.name=random", "stragglers.distribution=3"],
     "stragglers.distribution must be a string, got 3"),
])
def test_wrong_types(overrides, expected):
    message = error({"budget": {"epochs": 1}}, overrides)
    assert expected in message
    assert message.startswith("command line: ")


def test_wrong_type_in_the_file_blames_the_file():
    assert error({"optim": {"lr": "abc"}, "budget": {"epochs": 1}}) == \
        "jobs/x.yaml: optim.lr must be a number, got 'abc'"


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lr=-0.1"], "optim.lr must be a number > 0, got -0.1"),
    (["optim.momentum=1"], "optim.momentum must be a number >= 0 and < 1, got 1"),
    (["optim.warmup=1.5"], "optim.warmup must be a number >= 0 and < 1, got 1.5"),
    (["optim.weight_decay=-1"], "optim.weight_decay must be a number >= 0, got -1"),
    (["optim.clip_grad_norm=0"], "optim.clip_grad_norm must be a number > 0, got 0"),
    (["seed=-1"], "seed must be an integer >= 0 and <= 4294967295, got -1"),
    (["device=gpu"], "device must be one of auto, cpu, cuda, got 'gpu'"),
    (["data.batch_size=0"], "data.batch_size must be an integer >= 1, got 0"),
    (["budget.epochs=0"], "budget.epochs must be a number > 0, got 0"),
    (["eval.target_accuracy=1.5"], "eval.target_accuracy must be a number > 0 and <= 1, got 1.5"),
    (["checkpoint.keep=0"], "checkpoint.keep must be an integer >= 1, got 0"),
    (["optim.schedule.name=step", "optim.schedule.factor=2"],
     "optim.schedule.factor must be a number > 0 and <= 1, got 2"),
    (["optim.schedule.name=cosine", "optim.schedule.final=1e1"],
     "optim.schedule.final must be a number >= 0 and <= 1, got 10"),
    (["optim.momentum=0", "optim.nesterov=true"],
     "optim.nesterov needs optim.momentum > 0: set optim.momentum=0.9 or optim.nesterov=false"),
])
def test_out_of_range(overrides, expected):
    assert error(overrides=overrides) == f"command line: {expected}"


# ------------------------------------------------------------------ keys and names

def test_unknown_key_suggests_the_closest():
    assert error({"optim": {"lrr": 0.1}, "budget": {"epochs": 1}}) == (
        "jobs/x.yaml: unknown key 'optim.lrr': did you mean 'optim.lr'? "
        "(optim takes: lr, momentum, weight_decay, nesterov, schedule, warmup, scale_lr, reference_batch, "
        "clip_grad_norm)")


def test_unknown_section_suggests_the_closest():
    message = error({"optimm": {"lr": 0.1}})
    assert message.startswith("jobs/x.yaml: unknown key 'optimm': did you mean 'optim'? "
                              "(the top level takes: name, seed, device, policy,")
    assert "warnings" not in message


def test_unknown_component_param_suggests_among_the_chosen_ones():
    assert error(overrides=["policy.tua=3"]) == (
        "command line: unknown key 'policy.tua': did you mean 'policy.tau'? "
        "(policy 'aau' takes: name, tau, gamma, rate_scaled, max_scale)")
    assert "did you mean 'data.partition.alpha'" in error(
        overrides=["data.partition.name=dirichlet", "data.partition.alhpa=0.1"])


def test_unknown_component_name_gets_the_registry_message():
    assert error({"policy": {"name": "aua"}}) == (
        "jobs/x.yaml: policy.name: unknown policy 'aua': did you mean 'aau'? "
        "(choose from: aau, allreduce, async, async_one, dpsgd, fixed_k)")
    assert "data.partition.name: unknown partition scheme 'diriclet': did you mean 'dirichlet'" \
        in error(overrides=["data.partition.name=diriclet"])
    assert "optim.schedule.name must be a string, got 3" in error(
        overrides=["optim.schedule.name=3"])


def test_missing_required_param_says_what_to_set():
    assert error(overrides=["data.name=mnist"]) == (
        "command line: data.root is required for dataset 'mnist': "
        "set data.root=<folder with the IDX files>")
    config = config_from_dict({"budget": {"epochs": 1}},
                              overrides=["data.name=mnist", "data.root=/data/mnist"])
    assert config.data.params == {"root": "/data/mnist"}


# ------------------------------------------------------------------ structure

def test_section_must_be_a_mapping():
    assert error({"optim": [1, 2], "budget": {"epochs": 1}}) == \
        "jobs/x.yaml: optim must be a mapping like optim: {key: value}, got [1, 2]"
    assert "data.partition must be a mapping" in error(overrides=["data.partition=iid"])


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(UserError, match=r"job.yaml: the top level must be a mapping .* got list"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.1\n  momentum: [0.9\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML (line ")
    assert ", column " in message and message.endswith("): fix the syntax")
    assert "\n" not in message


def test_bad_explicit_tag_is_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "seed: !!int x\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match=r"not found: .*nope.yaml: check the --config path"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="check the --config path"):
        load_config(tmp_path)  # a directory


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=1", ".lr=1", "optim.=1"])
def test_malformed_override(bad):
    message = error(overrides=[bad])
    assert message.startswith(f"command line: bad override {bad!r}: write section.key=value")


def test_override_value_must_be_valid_yaml():
    assert error(overrides=["model.hidden=[1, 2"]).startswith(
        "command line: model.hidden: not valid YAML (line 1")


def test_override_through_a_scalar():
    assert error({"optim": {"lr": 0.1}}, ["optim.lr.x=1"]) == \
        "command line: cannot set 'optim.lr.x': 'optim.lr' is 0.1, not a section"


# ------------------------------------------------------------------ budget and topology

def test_budget_epochs_and_samples_conflict():
    assert "budget.epochs and budget.samples are both set: keep one" in \
        error({"budget": {"epochs": 1, "samples": 100}})


def test_budget_is_required():
    assert error({}) == "jobs/x.yaml: budget: set budget.epochs, budget.samples or budget.seconds"
    assert error(overrides=["budget.epochs=null"]).startswith("command line: budget: set")


def test_topology_name_and_file_conflict():
    message = error({"topology": {"name": "torus", "file": RING}, "budget": {"epochs": 1}})
    assert message.startswith("jobs/x.yaml: topology has both name 'torus' and file")
    assert "topology={file: x.yaml}" in message


def test_topology_file_takes_no_params():
    assert error({"topology": {"file": RING, "degree": 3}, "budget": {"epochs": 1}}) == (
        "jobs/x.yaml: 'topology.degree' does not go with topology.file "
        "(the file sets the whole topology): remove it")


def test_topology_file_must_exist():
    assert error(overrides=["topology.file=nowhere/ring.yaml"]) == (
        "command line: topology.file 'nowhere/ring.yaml' is not a file (relative paths start "
        "at the current directory): check the path")


def test_topology_generator_params():
    config = config_from_dict({"topology": {"name": "torus", "rows": 2}, "budget": {"epochs": 1}})
    assert config.topology == TopologyConfig("torus", None, {"rows": 2})
    # A null file means "no file": a file set in the job can be switched off.
    config = config_from_dict({"topology": {"file": RING}, "budget": {"epochs": 1}},
                              overrides=["topology.file=null", "topology.name=star"])
    assert config.topology == TopologyConfig("star", None, {})


# ------------------------------------------------------------------ properties

SCALAR_FIELDS = ["name", "seed", "device", "policy.name", "policy.tau", "policy.gamma",
                 "policy.rate_scaled", "topology.name", "topology.file", "topology.rows",
                 "data.name", "data.batch_size", "data.eval_batch_size", "data.test_fraction",
                 "data.partition", "data.partition.name", "data.partition.alpha", "model.name",
                 "model.hidden", "optim.lr", "optim.momentum", "optim.weight_decay",
                 "optim.nesterov", "optim.warmup", "optim.schedule", "optim.schedule.factor",
                 "optim.schedule.milestones", "budget.epochs", "budget.samples",
                 "budget.seconds", "stragglers.name", "eval.every_seconds", "eval.max_samples",
                 "eval.target_accuracy", "eval.rank_models", "checkpoint.enabled", "checkpoint.every_seconds",
                 "checkpoint.every_iterations", "checkpoint.keep", "output.dir", "output.trace",
                 "policy", "optim", "budget"]

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["1e-3", "1e6", "nan", "-inf", "2.0", "0", "aau", "ring", "step", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6)


def set_path(raw, path, value):
    *sections, key = path.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value


def validates_or_user_error(build):
    try:
        config = build()
    except UserError as err:
        assert "\n" not in str(err)
        return
    assert config_from_dict(yaml.safe_load(config.to_yaml())) == config


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(SCALAR_FIELDS), value=JUNK,
       schedule=st.sampled_from(["constant", "step", "cosine"]))
def test_junk_field_values_validate_or_raise_user_error(path, value, schedule):
    raw = {"budget": {"epochs": 1}, "optim": {"schedule": {"name": schedule}},
           "data": {"partition": {"name": "dirichlet"}}, "topology": {"name": "torus"}}
    set_path(raw, path, value)
    validates_or_user_error(lambda: config_from_dict(raw))


@settings(max_examples=300, deadline=None)
@given(raw=JUNK, overrides=st.lists(st.text(max_size=20) | st.sampled_from(SCALAR_FIELDS).map(
    lambda path: path + "=1"), max_size=3))
def test_junk_configs_and_overrides_raise_only_user_error(raw, overrides):
    validates_or_user_error(lambda: config_from_dict(raw, "junk", overrides))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60) | st.sampled_from(["seed: !!int x", "a: [", "{", "- 1", "x: y"]))
def test_junk_files_raise_only_user_error(tmp_path, text):
    path = tmp_path / "junk.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    validates_or_user_error(lambda: load_config(path))
