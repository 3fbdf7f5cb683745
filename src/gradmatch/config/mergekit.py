"""mergekit's merge YAML (`merge_method`, `base_model`, `models[].parameters`, ...) translated into gradmatch's
merge config, with mergekit's semantics for the methods both tools have (docs/merge.md, "mergekit configs")."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from gradmatch.errors import UserError

log = logging.getLogger(__name__)

#: mergekit's methods that gradmatch runs with mergekit's semantics, and the gradmatch method that does.
SHARED = {"linear": "average", "task_arithmetic": "task_arithmetic", "ties": "ties",
          "dare_linear": "dare", "dare_ties": "dare"}
#: mergekit 0.1.5's other methods (named in the refusal).
MERGEKIT_ONLY = ("slerp", "nuslerp", "multislerp", "passthrough", "model_stock", "arcee_fusion", "karcher",
                 "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "nearswap", "ram", "ramplus_tl")
#: mergekit's defaults: normalize and rescale per method (mergekit/merge_methods/registry.py).
_DEFAULT_NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False}
_DEFAULT_RESCALE = {"ties": False, "dare_linear": True, "dare_ties": True}
#: Parameters each shared method reads: per model (falling back to the top-level `parameters`) and top-level only.
_PER_MODEL = {"linear": ("weight",), "task_arithmetic": ("weight", "density"), "ties": ("weight", "density"),
              "dare_linear": ("weight", "density"), "dare_ties": ("weight", "density")}
_GLOBAL = {"linear": ("normalize",), "task_arithmetic": ("normalize", "lambda", "rescale", "int8_mask"),
           "ties": ("normalize", "lambda", "rescale", "int8_mask"),
           "dare_linear": ("normalize", "lambda", "rescale", "int8_mask", "seed"),
           "dare_ties": ("normalize", "lambda", "rescale", "int8_mask", "seed")}
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "fp64": "float64"}
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "base_hessian", "base_hessian_scale")
_UNSUPPORTED_TOP = {"slices": "layer slices", "modules": "per-module merges", "tokenizer": "tokenizer merging",
                    "chat_template": "chat templates"}


def is_mergekit(data: Mapping[str, Any]) -> bool:
    """A mergekit document names its method with `merge_method` (gradmatch's own form uses `method`)."""
    return "merge_method" in data


class _Doc:
    def __init__(self, data: Mapping[str, Any], source: str):
        self.data, self.source = data, source

    def fail(self, where: str, message: str) -> UserError:
        return UserError(f"{self.source}: {where}: {message}")

    def scalar(self, where: str, value: Any) -> Any:
        if isinstance(value, (list, dict)):
            raise self.fail(where, "per-layer values (mergekit's gradients and filters) are not supported: give one "
                                   "number for all tensors")
        return value

    def number(self, where: str, value: Any) -> float:
        value = self.scalar(where, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"must be a number, not {value!r}")
        return float(value)

    def flag(self, where: str, value: Any) -> bool:
        value = self.scalar(where, value)
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, not {value!r}")
        return value


def from_mergekit(data: Mapping[str, Any], source: str = "merge config") -> dict[str, Any]:
    """gradmatch's merge config (the YAML form) for a mergekit document; a UserError names what cannot be run."""
    doc = _Doc(data, source)
    method = data["merge_method"]
    if not isinstance(method, str):
        raise doc.fail("merge_method", f"must be the name of a merge method, not {type(method).__name__} {method!r}")
    if "method" in data:
        raise doc.fail("method", "give merge_method (mergekit's form) or method (gradmatch's), not both")
    from gradmatch.methods import method_names

    if method not in SHARED and method not in method_names():
        kind = "a mergekit method that gradmatch does not have" if method in MERGEKIT_ONLY else "not a merge method"
        own = [m for m in method_names() if m not in SHARED]
        raise doc.fail("merge_method", f"{method!r} is {kind}; gradmatch runs mergekit's {', '.join(SHARED)} "
                       f"(with mergekit's semantics) and its own {', '.join(own)}")
    for key in data:
        if key in _UNSUPPORTED_TOP:
            raise doc.fail(key, f"{_UNSUPPORTED_TOP[key]} are not supported by gradmatch (use models: with one base_model)")
        if key not in _TOP_KEYS:
            raise doc.fail(key, f"unknown key (a mergekit config has {', '.join(k for k in _TOP_KEYS if 'hessian' not in k)})")
    tokenizer = data.get("tokenizer_source")
    if tokenizer not in (None, "base"):
        raise doc.fail("tokenizer_source", f"{tokenizer!r} is not supported: gradmatch copies the base model's tokenizer "
                                           "(tokenizer_source: base)")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise doc.fail("models", "must be a non-empty list of {model: ..., parameters: {...}}")
    entries = []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise doc.fail(f"models[{i}]", "must be a mapping with a model")
        allowed = ("model", "parameters") if method in SHARED else ("model", "parameters", "hessian")
        unknown = [k for k in entry if k not in allowed]
        if unknown:
            raise doc.fail(f"models[{i}].{unknown[0]}", f"unknown key (a model entry has {', '.join(allowed)})")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise doc.fail(f"models[{i}].parameters", "must be a mapping")
        if not isinstance(entry["model"], str):
            raise doc.fail(f"models[{i}].model", "must be a path or hub id")
        entries.append({"model": entry["model"], "hessian": entry.get("hessian"), "parameters": dict(params),
                        "where": f"models[{i}]"})
    global_params = data.get("parameters") or {}
    if not isinstance(global_params, Mapping):
        raise doc.fail("parameters", "must be a mapping")
    if method in SHARED:  # mergekit's methods read no Hessian: one given would be silently unused
        for key in ("base_hessian", "base_hessian_scale"):
            if data.get(key) is not None:
                raise doc.fail(key, f"mergekit's {method} uses no Hessian (gradmatch's own methods, e.g. "
                                    "merge_method: gradient_matching, do)")
    config = _shared(doc, method, entries, dict(global_params)) if method in SHARED else \
        _own(doc, method, entries, dict(global_params))
    out_dtype = data.get("out_dtype") or data.get("dtype")  # mergekit writes in dtype unless out_dtype says otherwise
    if out_dtype is not None:
        key = "out_dtype" if data.get("out_dtype") else "dtype"
        if not isinstance(out_dtype, str) or out_dtype.lower() not in _DTYPES:
            raise doc.fail(key, f"{out_dtype!r} is not a floating dtype gradmatch writes ({', '.join(sorted(set(_DTYPES.values())))})")
        config["out_dtype"] = _DTYPES[out_dtype.lower()]
    return config


def _shared(doc: _Doc, method: str, entries: list[dict], global_params: dict) -> dict[str, Any]:
    """A method both tools have, with mergekit's semantics (mergekit 0.1.5, merge_methods/)."""
    # mergekit ignores parameters its method does not read: so does the translation, but it says so
    for key in [k for k in global_params if k not in _PER_MODEL[method] + _GLOBAL[method]]:
        log.warning("%s: parameters.%s is not a parameter of mergekit's %s (it reads %s): ignored, as mergekit does",
                    doc.source, key, method, ", ".join(_PER_MODEL[method] + _GLOBAL[method]))
        del global_params[key]
    for e in entries:
        for key in [k for k in e["parameters"] if k not in _PER_MODEL[method]]:
            log.warning("%s: %s.parameters.%s is not a per-model parameter of mergekit's %s (it reads %s): ignored, "
                        "as mergekit does", doc.source, e["where"], key, method, ", ".join(_PER_MODEL[method]))
            del e["parameters"][key]

    def per_model(e: dict, name: str, default: Any = None) -> Any:
        where = f"{e['where']}.parameters.{name}"
        if name in e["parameters"]:
            return doc.scalar(where, e["parameters"][name])
        if name in global_params:
            return doc.scalar(f"parameters.{name}", global_params[name])
        if default is None and e["where"] == "base_model":
            raise doc.fail("base_model", f"linear merges base_model {e['model']} as one more model, which needs a "
                                         f"{name}: list it under models with parameters.{name}, or set parameters.{name}")
        if default is None:
            raise doc.fail(e["where"], f"{e['model']} has no {name} (mergekit needs one for every model: set "
                                       f"{e['where']}.parameters.{name} or parameters.{name})")
        return default

    def weight(e: dict) -> float:
        return doc.number(f"{e['where']}.parameters.weight", per_model(e, "weight"))

    def option(name: str, default: Any) -> Any:
        return doc.scalar(f"parameters.{name}", global_params.get(name, default))

    normalize = doc.flag("parameters.normalize", option("normalize", _DEFAULT_NORMALIZE[method]))
    base = doc.data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise doc.fail("base_model", "must be a path or hub id")
    if method == "linear":  # the base model is one more input when given (mergekit adds it)
        inputs = entries + ([{"model": base, "parameters": {}, "where": "base_model"}]
                            if base is not None and all(e["model"] != base for e in entries) else [])
        weights = [weight(e) for e in inputs]
        children = [(e, w) for e, w in zip(inputs, weights) if e["model"] != base]
        params: dict[str, Any] = {"normalize": normalize}
        if base is not None:
            params.update(include_base=True, base_weight=next(w for e, w in zip(inputs, weights) if e["model"] == base))
        else:
            base = inputs[0]["model"]  # its config and tokenizer are the output's
        if not children:
            raise doc.fail("models", "linear needs at least one model besides base_model")
        return {"method": "average", "base": base, "models": [{"model": e["model"], "weight": w} for e, w in children],
                "parameters": params}
    if base is None:
        raise doc.fail("base_model", f"mergekit's {method} needs base_model (the parent the task vectors start from)")
    children = [e for e in entries if e["model"] != base]  # mergekit skips the base model's own entry
    if not children:
        raise doc.fail("models", f"{method} needs at least one model besides base_model")
    models = [{"model": e["model"], "weight": weight(e)} for e in children]
    densities = []
    for e in children:
        d = doc.number(f"{e['where']}.parameters.density", per_model(e, "density", 1.0))
        if not d > 0:
            raise doc.fail(f"{e['where']}.parameters.density", f"must be positive, got {d:g}")
        densities.append(min(d, 1.0))  # mergekit keeps every entry from density 1 up
    scale = doc.number("parameters.lambda", option("lambda", 1.0))
    rescale = doc.flag("parameters.rescale", option("rescale", _DEFAULT_RESCALE.get(method, False)))
    doc.flag("parameters.int8_mask", option("int8_mask", False))  # a memory option of mergekit's: no effect here
    if method == "task_arithmetic":
        params = {"scale": scale, "normalize": normalize}  # density and rescale: no sparsification in mergekit's
    elif method == "ties":
        params = {"density": densities, "scale": scale, "disjoint_mean": "weights" if normalize else "sum",
                  "rescale": rescale, "edge_rules": "mergekit"}
    else:  # dare_linear, dare_ties: mergekit's density is the probability of keeping an entry
        params = {"p": [1.0 - d for d in densities], "rescale": "l1" if rescale else "none", "scale": scale}
        if "seed" in global_params:
            params["seed"] = global_params["seed"]
        if method == "dare_ties":
            params.update(combine="ties", disjoint_mean="weights" if normalize else "sum", edge_rules="mergekit")
        else:
            params.update(combine="task_arithmetic", normalize=normalize)
    return {"method": SHARED[method], "base": base, "models": models, "parameters": params}


def _own(doc: _Doc, method: str, entries: list[dict], global_params: dict) -> dict[str, Any]:
    """One of gradmatch's own methods (gradient_matching, fisher_average, ...) written in mergekit's form:
    per-model `hessian:`, `parameters: {weight, hessian_scale}`; the base model's Hessian on its own entry
    in `models` or as top-level `base_hessian`. gradmatch's semantics."""
    base = doc.data.get("base_model")
    if base is None:  # the first model would become the parent and stay a child
        raise doc.fail("base_model", f"{method} needs base_model: the parent the models were fine-tuned from")
    config: dict[str, Any] = {"method": method}
    if doc.data.get("base_hessian") is not None:
        config["base_hessian"] = doc.data["base_hessian"]
    if doc.data.get("base_hessian_scale") is not None:
        config["base_hessian_scale"] = doc.data["base_hessian_scale"]
    defaults = {k: global_params.pop(k) for k in ("weight", "hessian_scale") if k in global_params}
    children = []
    for e in entries:
        if base is not None and e["model"] == base:  # the parent's own entry: its Hessian
            if e["hessian"] is not None:
                config["base_hessian"] = e["hessian"]
            if "hessian_scale" in e["parameters"]:
                config["base_hessian_scale"] = e["parameters"]["hessian_scale"]
            continue
        child = {"model": e["model"], **({"hessian": e["hessian"]} if e["hessian"] is not None else {})}
        for key in ("weight", "hessian_scale"):
            value = e["parameters"].pop(key, defaults.get(key))
            if value is not None:
                child[key] = value
        if e["parameters"]:
            raise doc.fail(f"{e['where']}.parameters.{next(iter(e['parameters']))}",
                           "per-model parameters of gradmatch's methods are weight and hessian_scale")
        children.append(child)
    if not children:
        raise doc.fail("models", f"{method} needs at least one model besides base_model")
    config["base"] = base
    config["models"] = children
    config["parameters"] = global_params
    return config
