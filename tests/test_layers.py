"""The import rule of docs/architecture.md, read from the code: a crossing fails CI.

A module imports only its own folder or the folders below it; comm and
algorithms never import each other; comm imports no torch, algorithms and
base neither torch nor MPI. Every import counts, those inside functions too
(a lazy import is still a dependency).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "aau_mpi"

# Each folder's height; the package root (the commands) stands above them all.
LAYERS = {"base": 0, "comm": 1, "algorithms": 1, "decentralized": 2, "training": 3}
ROOT_LAYER = 4
NEVER_EACH_OTHER = {("comm", "algorithms"), ("algorithms", "comm")}
FORBIDDEN_PACKAGES = {"base": {"torch", "mpi4py"}, "comm": {"torch"},
                      "algorithms": {"torch", "mpi4py"}}


def folder_of(module):
    """'aau_mpi.comm.mailbox' -> 'comm'; a root module ('aau_mpi.train') -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def imported_modules(tree):
    """(line, dotted name) of every import in the tree, `from aau_mpi import X` as aau_mpi.X."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module in ("aau_mpi",) or node.module.split(".")[-1] in LAYERS:
                for alias in node.names:  # a module of the package or of a folder
                    yield node.lineno, f"{node.module}.{alias.name}"
            else:
                yield node.lineno, node.module


def crossings(package):
    """Every import that breaks the rule, as 'file:line: what'."""
    found = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent)
        here = relative.parts[1] if len(relative.parts) > 2 else ""
        height = LAYERS.get(here, ROOT_LAYER)
        for line, name in imported_modules(ast.parse(path.read_text(), str(path))):
            where = f"{relative}:{line}"
            top = name.split(".")[0]
            if top in FORBIDDEN_PACKAGES.get(here, ()):
                found.append(f"{where}: {here}/ imports {top}")
            if top != "aau_mpi":
                continue
            there = folder_of(name)
            if not there and name.count(".") == 1 and name.split(".")[1] in LAYERS:
                there = name.split(".")[1]  # `from aau_mpi import comm`
            if (here, there) in NEVER_EACH_OTHER:
                found.append(f"{where}: {here}/ imports {name} ({here} and {there} never "
                             f"import each other)")
            elif LAYERS.get(there, ROOT_LAYER) > height:
                found.append(f"{where}: {here or 'the root'} imports {name}, a layer above it")
    return found


def test_no_module_imports_a_layer_above_it_or_a_forbidden_package():
    assert crossings(PACKAGE) == []


def test_every_kind_of_crossing_is_caught(tmp_path):
    package = tmp_path / "aau_mpi"
    files = {
        "__init__.py": "",
        "train.py": "from aau_mpi.training import config\n",            # allowed: down
        "base/__init__.py": "", "base/errors.py": "",
        "comm/__init__.py": "",
        "comm/mailbox.py": "import torch\nfrom aau_mpi.algorithms.policies import Policy\n",
        "algorithms/__init__.py": "",
        "algorithms/policies.py": "def f():\n    from mpi4py import MPI\n",
        "decentralized/__init__.py": "",
        "decentralized/checkpoint.py": "from aau_mpi.training.models import build_model\n",
        "training/__init__.py": "",
        "training/models.py": "from aau_mpi import train\nfrom aau_mpi.base import errors\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    found = crossings(package)
    assert found == [
        "aau_mpi/algorithms/policies.py:2: algorithms/ imports mpi4py",
        "aau_mpi/comm/mailbox.py:1: comm/ imports torch",
        "aau_mpi/comm/mailbox.py:2: comm/ imports aau_mpi.algorithms.policies "
        "(comm and algorithms never import each other)",
        "aau_mpi/decentralized/checkpoint.py:1: decentralized imports "
        "aau_mpi.training.models, a layer above it",
        "aau_mpi/training/models.py:1: training imports aau_mpi.train, a layer above it",
    ], found
