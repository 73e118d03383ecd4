"""environment.yml (conda, GPU clusters) and setup.py must not disagree."""

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# Same package, different name on conda-forge.
CONDA_NAME = {"torch": "pytorch"}


def setup_list(name):
    """A top-level list assigned in setup.py, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name} list")


def package(requirement):
    """'numpy>=1.24' -> 'numpy'"""
    return re.match(r"[A-Za-z0-9_.\-]+", requirement.strip()).group(0).lower()


def conda_packages():
    """Names the file installs: conda packages and pip requirements (not pip options like -e)."""
    spec = yaml.safe_load((REPO / "environment.yml").read_text())
    names = set()
    for dependency in spec["dependencies"]:
        if isinstance(dependency, str):
            names.add(package(dependency))
        else:
            names.update(package(r) for r in dependency.get("pip", []) if not r.startswith("-"))
    return names, spec


def test_every_runtime_dependency_of_setup_py_is_in_environment_yml():
    names, _ = conda_packages()
    runtime = [package(r) for r in setup_list("RUNTIME")]
    missing = [r for r in runtime if CONDA_NAME.get(r, r) not in names]
    assert not missing, f"add {missing} to environment.yml"


def test_every_runtime_package_of_environment_yml_is_in_setup_py():
    """The conda file may add an MPI, test and plot tools and pip, nothing else
    that the package needs at run time without setup.py knowing."""
    names, _ = conda_packages()
    runtime = {CONDA_NAME.get(r, r) for r in map(package, setup_list("RUNTIME"))}
    extras = ast.parse((REPO / "setup.py").read_text())
    tools = {"python", "pip", "openmpi", "mpich", "cuda-version", "pytorch-gpu"}
    for node in ast.walk(extras):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            for requirements in ast.literal_eval(node.value).values():
                tools.update(package(r) for r in requirements)
    unknown = names - runtime - tools
    assert not unknown, f"environment.yml installs {sorted(unknown)}, which setup.py does not list"


def test_environment_installs_the_package_itself_and_an_mpi():
    names, spec = conda_packages()
    pip = [d for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert pip and "-e ." in pip[0]["pip"]
    assert names & {"openmpi", "mpich"}, "mpi4py needs an MPI library"
    assert {"pytest", "pytest-mpi"} <= names
