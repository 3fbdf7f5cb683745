"""Run mergekit itself on the mergekit YAMLs of tests/test_mergekit.py and print the outputs the test stores
(MERGEKIT_OUTPUTS), and how far gradmatch's merges of the same YAMLs are from mergekit's.

    python benchmarks/mergekit_expectations.py [--mergekit-venv PATH]

mergekit runs from its own virtual environment (see benchmarks/README.md); gradmatch never imports it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_mergekit import CASES, build, fingerprint, load, materialise, tied_values  # noqa: E402


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{x:.9g}" for x in value) + "]"
    return f"{value:.12g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mergekit-venv", type=Path, default=REPO / ".venv-mergekit")
    args = p.parse_args(argv)
    exe = args.mergekit_venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        raise SystemExit(f"no mergekit-yaml in {args.mergekit_venv} (see benchmarks/README.md)")
    version = subprocess.run([str(args.mergekit_venv / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True).stdout.strip()
    outputs, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = build(Path(tmp) / "tied", tied_values)
        for name, case in CASES.items():
            config = Path(tmp) / f"{name}.yaml"
            config.write_text(yaml.safe_dump(materialise(case, root)))
            mk, gm = Path(tmp) / f"mk-{name}", Path(tmp) / f"gm-{name}"
            subprocess.run([str(exe), str(config), str(mk), "--quiet"], check=True, capture_output=True)
            subprocess.run([sys.executable, "-m", "gradmatch", "merge", str(config), str(gm), "--quiet", "--no-card"],
                           check=True, capture_output=True)
            a, b = load(gm), load(mk)
            outputs[name] = fingerprint(b)
            errors[name] = max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max())
                               for k in b)
    print(f"# mergekit {version}: MERGEKIT_OUTPUTS = {{")
    for name, fp in outputs.items():
        print(f"    {name!r}: {{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in fp.items()) + "},")
    print("}")
    print("# gradmatch vs mergekit, largest relative error per case (max |a-b| / max |b| per tensor):")
    print(json.dumps({k: f"{v:.2e}" for k, v in errors.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
