"""The layering of ARCHITECTURE.md, checked from the source's own imports (``ast``, nothing is imported).

Every ``.py`` file of the package (``sparsekern/``, and ``kernels/`` as ``sparsekern.kernels``) and the
top-level ``bench/`` shim is parsed; each import, including those inside functions, is resolved to a
module of the package. Three rules:

1. a module imports only modules of its own layer or of layers below it (``LAYERS``, lowest first);
2. no module reads another file's underscore names: ``from m import _x``, ``m._x`` on an imported
   module ``m``, or a private module (``pkg._m``) from outside ``pkg``. ``@triton.jit`` helpers are the
   one exception (STYLE.md): Triton inlines them into the kernels that call them;
3. ``kernels/`` never imports ``torch.nn`` (``torch.nn.functional`` is fine: it holds no modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS = (
    ("kernels", ("sparsekern.kernels",)),
    ("layout", ("sparsekern.layout", "sparsekern.convview")),
    ("reports", ("sparsekern.reports",)),
    ("functional", ("sparsekern.functional",)),
    ("nn", ("sparsekern.nn",)),
    ("flops", ("sparsekern.flops",)),
    ("methods", ("sparsekern.methods",)),
    ("adapters", ("sparsekern.adapters",)),
    ("facade", ("sparsekern",)),  # sparsekern/__init__.py: the public names
    ("tools", ("sparsekern.testing", "sparsekern.bench", "sparsekern.check", "bench")),
)

# (importer, imported name) pairs that break rule 2 on purpose, each with its reason. Empty today.
ALLOWED_PRIVATE: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "sparsekern")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(p for d in ("sparsekern", "kernels", "bench") for p in (REPO / d).rglob("*.py"))


FILES = {module_name(p): p for p in source_files()}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in FILES.items()}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer of LAYERS: add it (and to ARCHITECTURE.md)"
    return rank


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def triton_jit_names(module: str) -> set[str]:
    """Functions of ``module`` decorated with ``@triton.jit`` (or ``@jit``)."""
    out = set()
    for node in TREES[module].body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if ast.unparse(target) in ("triton.jit", "jit"):
                    out.add(node.name)
    return out


def imports(module: str):
    """``(line, imported module, name or None, alias bound in this file)`` for each of the package's imports."""
    package = module if FILES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in FILES:
                    # `import a.b` binds `a`; `import a.b as c` binds `c` to a.b.
                    yield node.lineno, a.name, None, (a.asname, a.name) if a.asname else (a.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in FILES:
                continue
            for a in node.names:
                sub = f"{source}.{a.name}"
                if sub in FILES:  # `from pkg import module`
                    yield node.lineno, sub, None, (a.asname or a.name, sub)
                else:
                    yield node.lineno, source, a.name, None


def module_aliases(module: str) -> dict[str, str]:
    """Local names bound to one of the package's modules (``import sparsekern.kernels.bsmm as bsmm`` and alike)."""
    out = {}
    for _, _, _, bound in imports(module):
        if bound is not None:
            local, target = bound
            out[local] = target if target is not None else local
    return out


def dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def test_every_file_is_in_a_layer():
    assert len(FILES) > 40
    for name in FILES:
        layer_of(name)


def test_imports_run_down_the_layers():
    bad = []
    for module in FILES:
        mine = layer_of(module)
        for line, target, _, _ in imports(module):
            theirs = layer_of(target)
            if theirs > mine:
                bad.append(
                    f"{FILES[module].relative_to(REPO)}:{line}: {module} ({LAYERS[mine][0]}) imports "
                    f"{target} ({LAYERS[theirs][0]}), a layer above it"
                )
    assert not bad, "\n".join(bad)


def test_no_underscore_names_across_files():
    bad = []
    for module in FILES:
        where = FILES[module].relative_to(REPO)
        package = module if FILES[module].name == "__init__.py" else module.rpartition(".")[0]
        found = []
        for line, target, name, _ in imports(module):
            if target == module:
                continue
            parent, _, last = target.rpartition(".")
            if is_private(last) and not (package == parent or package.startswith(parent + ".")):
                found.append((line, target, f"the private module {target}"))
            if name is not None and is_private(name) and name not in triton_jit_names(target):
                found.append((line, f"{target}.{name}", f"{name} from {target}"))
        aliases = module_aliases(module)
        for node in ast.walk(TREES[module]):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                head = dotted(node.value)
                if head is None:
                    continue
                root, _, rest = head.partition(".")
                if root not in aliases:
                    continue
                target = aliases[root] + (f".{rest}" if rest else "")
                if target in FILES and target != module and node.attr not in triton_jit_names(target):
                    found.append((node.lineno, f"{target}.{node.attr}", f"{head}.{node.attr}"))
        for line, key, what in found:
            if (module, key) not in ALLOWED_PRIVATE:
                bad.append(f"{where}:{line}: {module} reads {what}")
    assert not bad, "\n".join(bad)


def test_kernels_never_import_torch_nn():
    bad = []
    for module, tree in TREES.items():
        if layer_of(module) != 0:
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if (n == "torch.nn" or n.startswith("torch.nn.")) and not n.startswith("torch.nn.functional"):
                    bad.append(f"{FILES[module].relative_to(REPO)}:{node.lineno}: imports {n}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "source, expect",
    [
        ("from sparsekern.methods import sparsify\n", "imports sparsekern.methods"),
        ("from sparsekern.kernels.configs import _tuned_cache\n", "_tuned_cache from sparsekern.kernels.configs"),
        ("from sparsekern.kernels import configs\nconfigs._tuned_cache.clear()\n", "configs._tuned_cache"),
    ],
)
def test_the_checks_can_fail(monkeypatch, source, expect):
    """A layout module that imports upwards, or reads a private name, is caught (the rules are not vacuous)."""
    fake = "sparsekern.layout"
    monkeypatch.setitem(TREES, fake, ast.parse(source))
    failures = []
    for check in (test_imports_run_down_the_layers, test_no_underscore_names_across_files):
        try:
            check()
        except AssertionError as e:
            failures.append(str(e))
    assert any(expect in f for f in failures), failures
