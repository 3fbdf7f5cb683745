"""Methods live in one file each: a new file is a new method everywhere; the registry is light; no import circles."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_merge import build_family, load_folder

SRC = Path(__file__).resolve().parents[1] / "src"


def test_reading_the_registry_does_not_import_torch():
    code = ("import sys; from gradmatch.methods import registry; from gradmatch.config.merge import MergeConfig; "
            "registry(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_a_renamed_copy_of_a_method_file_is_a_new_method_everywhere(tmp_path):
    """Copy task_arithmetic.py to scaled_sum.py in a copy of the package: the YAML and --method know it at once."""
    tree = tmp_path / "src"
    shutil.copytree(SRC / "gradmatch", tree / "gradmatch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(tree / "gradmatch" / "methods" / "task_arithmetic.py", tree / "gradmatch" / "methods" / "scaled_sum.py")
    fam = build_family(tmp_path / "fam", T=2)
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "gradmatch", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path)

    config = {"method": "scaled_sum", "base": str(fam["parent"]),
              "models": [{"model": str(c), "weight": 0.5} for c in fam["children"]]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    by_yaml = run("merge", tmp_path / "m.yaml", tmp_path / "yaml-out", "--quiet")
    assert by_yaml.returncode == 0, by_yaml.stderr
    by_flag = run("merge", "--method", "scaled_sum", "--pretrained_model_name_or_path", fam["parent"],
                  "--ft_model_name_or_paths", ",".join(map(str, fam["children"])), "--scaling_factor", "0.5",
                  "--out_model_path", tmp_path / "flag-out", "--quiet")
    assert by_flag.returncode == 0, by_flag.stderr
    assert "scaled_sum" in run("merge", "--help").stdout
    parent = load_folder(fam["parent"])
    children = [load_folder(c) for c in fam["children"]]
    for out in ("yaml-out", "flag-out"):
        merged = load_folder(tmp_path / out)
        for name, theta_0 in parent.items():
            if not theta_0.is_floating_point():
                continue
            expected = theta_0.double() + sum(0.5 * (c[name].double() - theta_0.double()) for c in children)
            assert torch.allclose(merged[name].double(), expected, atol=1e-6), (out, name)
    unknown = run("merge", "--method", "no_such_method", "--pretrained_model_name_or_path", fam["parent"],
                  "--ft_model_name_or_paths", str(fam["children"][0]), "--out_model_path", tmp_path / "x")
    assert unknown.returncode == 2 and "scaled_sum" in unknown.stderr


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every gradmatch module ``path`` imports, at any depth of the file (lazy imports count too)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("gradmatch")}


def test_no_import_circles_in_src():
    """Edges to a module's own ancestor packages are left out: Python imports those first in any case."""
    modules = {_module_name(p): p for p in (SRC / "gradmatch").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = {t for t in _imports(path, name) if t in modules and t != name}
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
