"""The naive comparator of the merge benchmark: gradient matching as the original script does it.

Everything is loaded fully into memory with ``from_pretrained`` — the parent, its Hessian, every child
and every child's Hessian — the formula of docs/merge.md (one α for all tasks) is applied to whole state
dicts, and the result is written with ``save_pretrained``. Memory therefore grows with the number of
children; that is the point of comparison for the streaming engine. The flags are the original's::

    python benchmarks/naive_merge.py --pretrained_model_name_or_path P --pretrained_hessian_path HP \
        --ft_model_name_or_paths A,B --ft_hessian_paths HA,HB --scaling_factor_pt 1000 \
        --scaling_factors_ft 1000,1000 --delta_0 1e-12 --scaling_factor 1.0 --out_model_path OUT

Only the benchmark uses it; it is not part of the gradmatch package.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForSequenceClassification


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--pretrained_hessian_path", required=True)
    p.add_argument("--ft_model_name_or_paths", required=True, help="comma-separated children")
    p.add_argument("--ft_hessian_paths", required=True, help="comma-separated Hessians, one per child")
    p.add_argument("--scaling_factor_pt", type=float, default=1.0)
    p.add_argument("--scaling_factors_ft", required=True, help="comma-separated N_t, one per child")
    p.add_argument("--delta_0", type=float, default=1e-12)
    p.add_argument("--scaling_factor", type=float, default=1.0, help="α, one for all tasks")
    p.add_argument("--out_model_path", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    load = AutoModelForSequenceClassification.from_pretrained
    children = args.ft_model_name_or_paths.split(",")
    hessians = args.ft_hessian_paths.split(",")
    scales = [float(s) for s in args.scaling_factors_ft.split(",")]
    if not (len(children) == len(hessians) == len(scales)):
        raise SystemExit("need one Hessian and one scale per child")

    # Everything in memory at once, as the original script does.
    parent = load(args.pretrained_model_name_or_path)
    parent_hessian = load(args.pretrained_hessian_path).state_dict()
    ft_models = [load(path).state_dict() for path in children]
    ft_hessians = [load(path).state_dict() for path in hessians]

    alpha, n_0, delta = args.scaling_factor, args.scaling_factor_pt, args.delta_0
    theta_0 = parent.state_dict()
    merged = {}
    with torch.no_grad():
        for key, p0 in theta_0.items():
            if not p0.is_floating_point():
                merged[key] = p0
                continue
            h_0 = n_0 * parent_hessian[key] + delta
            denominator = alpha * sum(n_t * h[key] for n_t, h in zip(scales, ft_hessians)) + h_0
            numerator = sum(
                (n_t * h[key] + h_0) * (theta[key] - p0) for n_t, h, theta in zip(scales, ft_hessians, ft_models)
            )
            merged[key] = p0 + alpha * numerator / denominator
    parent.load_state_dict(merged)
    parent.save_pretrained(args.out_model_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
