"""No shipped code unpickles a file: a model package, checkpoint or array from disk is data, never code.

An AST scan (not grep: aliases, keyword arguments and comments are told apart) of every package we ship. It
flags pickle-family loaders, ``torch.load`` without a literal ``weights_only=True``, ``numpy.load`` with
``allow_pickle=True``, and YAML loaders that can build arbitrary objects.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("daemon", "engine", "training", "bench", "examples")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
PICKLE_CALLS = {"load", "loads", "Unpickler", "open"}  # shelve.open unpickles too
# Known exceptions, counted exactly so a new one fails the test. Each needs a reason and an owner.
ALLOWED: dict[tuple[str, str], int] = {}  # none: checkpoints hold tensors, numbers and plain dicts only


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value == value for k in call.keywords
    )


def findings(source: str) -> list[str]:
    """What is unsafe in one module's source."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name → module or module.function it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        module, _, func = full.rpartition(".")
        if module.split(".")[0] in PICKLE_MODULES and func in PICKLE_CALLS:
            out.append(f"{full} (unpickling)")
        elif full == "torch.load" and not _kw_is(node, "weights_only", True):
            out.append("torch.load without weights_only=True")
        elif full in ("numpy.load", "np.load") and _kw_is(node, "allow_pickle", True):
            out.append("numpy.load with allow_pickle=True")
        elif full in ("yaml.unsafe_load", "yaml.full_load") or (
            full == "yaml.load"
            and not any(k.arg == "Loader" and "Safe" in _dotted(k.value) for k in node.keywords)
        ):
            out.append(f"{full} without a safe loader")
        elif full in ("pandas.read_pickle", "pd.read_pickle"):
            out.append(f"{full} (unpickling)")
    return out


@pytest.mark.parametrize(
    "code, expected",
    [
        ("import pickle\npickle.load(open('f', 'rb'))", ["pickle.load (unpickling)"]),
        ("import pickle as p\np.loads(b'')", ["pickle.loads (unpickling)"]),
        ("from pickle import load\nload(f)", ["pickle.load (unpickling)"]),
        ("import joblib\njoblib.load('m.pkl')", ["joblib.load (unpickling)"]),
        ("import torch\ntorch.load('x.pt')", ["torch.load without weights_only=True"]),
        ("import torch\ntorch.load('x.pt', weights_only=False)", ["torch.load without weights_only=True"]),
        ("import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)", []),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", ["numpy.load with allow_pickle=True"]),
        ("import numpy as np\nnp.load('a.npy')", []),
        ("import yaml\nyaml.load(s)", ["yaml.load without a safe loader"]),
        ("import yaml\nyaml.load(s, Loader=yaml.SafeLoader)", []),
        ("import yaml\nyaml.safe_load(s)", []),
        ("# pickle.load(f) in a comment\nx = 'torch.load(p)'", []),
    ],
)
def test_the_scanner_itself(code: str, expected: list[str]) -> None:
    assert findings(code) == expected


def test_no_shipped_code_unpickles_a_file() -> None:
    found: Counter[tuple[str, str]] = Counter()
    for package in SHIPPED:
        for path in sorted((REPO / package).rglob("*.py")):
            for f in findings(path.read_text(encoding="utf-8")):
                found[(path.relative_to(REPO).as_posix(), f)] += 1
    unexpected = {k: n for k, n in found.items() if n > ALLOWED.get(k, 0)}
    assert not unexpected, f"unsafe deserialisation: {unexpected}"
    daemon_side = {k: n for k, n in found.items() if k[0].split("/")[0] in ("daemon", "engine", "examples")}
    assert not daemon_side, "the daemon and the engine never unpickle anything"
