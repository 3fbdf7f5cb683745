"""What bfloat16 storage of the Hessians changes in a gradient-matching merge: the same merge with every Hessian
as written (float32) and rounded to bfloat16 (what `gradmatch fisher --out-dtype bfloat16` stores), compared per
entry against docs/fisher.md's bound |θ_bf16 − θ_f32| ≤ (2u/(1−u))·max_t |τ_t| (u = 2⁻⁹), and relative to the
merged weights.

    python benchmarks/fisher_dtype.py --parent smollm2 --parent-hessian RUN/seed-0/fisher/parent \\
        --children RUN/seed-0/models/child-* --alpha 1.0

Children's Hessians are read from CHILD/hessian (AdamW's, saved by training) unless --child-hessians names them;
their N_t from their training_metadata.json. Outputs go to --workdir (default /tmp/gradmatch-bench-fisher-dtype).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

U = 2.0 ** -9  # bfloat16's unit roundoff (round to nearest, 8 significant bits)


def bf16_copy(hessian: Path, target: Path) -> Path:
    """``hessian`` (a Hessian folder, or a folder holding hessian/) with every tensor rounded to bfloat16."""
    from safetensors.torch import load_file, save_file

    folder = hessian / "hessian" if (hessian / "hessian").is_dir() else hessian
    out = target / "hessian"
    if out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in folder.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(__import__("torch").bfloat16) for k, v in load_file(str(f)).items()}, str(out / f.name),
                      metadata={"format": "pt"})
        else:
            shutil.copy(f, out / f.name)
    return target


def merge(parent: str, parent_hessian: Path, children: list[Path], hessians: list[Path], alpha: float,
          out: Path, n0: float) -> Path:
    import yaml

    config = {"method": "gradient_matching", "base": parent, "base_hessian": str(parent_hessian),
              "base_hessian_scale": n0,
              "models": [{"model": str(c), "hessian": str(h), "weight": alpha} for c, h in zip(children, hessians)]}
    spec = out.with_suffix(".yaml")
    spec.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "gradmatch", "merge", str(spec), str(out), "--overwrite", "-q",
                             "--out-dtype", "float32"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parent", required=True)
    p.add_argument("--parent-hessian", required=True, type=Path)
    p.add_argument("--children", nargs="+", required=True, type=Path)
    p.add_argument("--child-hessians", nargs="*", type=Path, default=None)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--n0", type=float, default=800.0, help="N_0, the parent's Hessian scale (llm-sentiment's)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gradmatch-bench-fisher-dtype"))
    args = p.parse_args(argv)
    import torch
    from safetensors import safe_open

    from gradmatch.checkpoints import Checkpoint
    from gradmatch.models import resolve_model

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    hessians = args.child_hessians or [c / "hessian" for c in args.children]
    f32 = merge(args.parent, args.parent_hessian, args.children, hessians, args.alpha, work / "merged-f32", args.n0)
    low = [bf16_copy(h, work / f"h{i}-bf16") for i, h in enumerate([args.parent_hessian, *hessians])]
    b16 = merge(args.parent, low[0], args.children, low[1:], args.alpha, work / "merged-bf16", args.n0)

    parent = Checkpoint(resolve_model(args.parent))
    kids = [Checkpoint(c) for c in args.children]
    worst_rel, worst_update, over = 0.0, 0.0, 0
    entries = 0
    with safe_open(str(f32 / "model.safetensors"), "pt") as fa, safe_open(str(b16 / "model.safetensors"), "pt") as fb:
        for name in fa.keys():
            a, b = fa.get_tensor(name).double(), fb.get_tensor(name).double()
            base = parent.read(name).double()
            tau = torch.stack([k.read(name).double() - base for k in kids]).abs().amax(0)
            delta = (a - b).abs()
            bound = 2 * U / (1 - U) * tau
            entries += delta.numel()
            over += int((delta > bound + 2.0 ** -23 * a.abs()).sum())  # one float32 step of the output allowed for
            worst_rel = max(worst_rel, float(delta.max() / a.abs().max().clamp_min(1e-30)))
            update = (a - base).abs().max()
            if float(update) > 0:
                worst_update = max(worst_update, float(delta.max() / update))
    result = {"entries": entries, "entries_over_bound (one float32 step of the output allowed)": over,
              "bound (2u/(1-u))": 2 * U / (1 - U), "max |Δ| / max |θ| per tensor": worst_rel,
              "max |Δ| / max |θ − θ_0| per tensor": worst_update}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
