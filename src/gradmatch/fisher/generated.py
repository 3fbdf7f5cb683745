"""The data-free Fisher of a causal LM (`gradmatch fisher --data generated`): sequences sampled from the model
itself, seeded per sequence, then the exact per-sequence squared gradients of log p(new tokens | prompt)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradmatch.errors import UserError
from gradmatch.fisher import (
    FisherAccumulator,
    check_statistics_arguments,
    distributed_run,
    model_fingerprint,
    write_hessian,
)
from gradmatch.fisher.accumulator import check_checkpointable
from gradmatch.fisher.files import hessian_dtype
from gradmatch.kinds._classifier import example_uniforms
from gradmatch.kinds.base import INDEX_KEY

#: What the stored Fisher is the mean of (fisher.json ``quantity``).
QUANTITY = "mean over sampled sequences of squared per-sequence gradients of log p(new tokens | prompt)"

#: The kind of model whose own distribution of sequences is sampled.
_CAUSAL_LM = "causal-lm"

_NO_LM_HEAD = ("as the H_0 of a merge from this pretrained base, set `base_hessian: prior` in the merge config (an "
               "isotropic prior, docs/merge.md \"Merging from a pretrained base\")")


# --------------------------------------------------------------------------- what each sequence starts from


def _start_token(tokenizer, config) -> int:
    """The id every sequence starts from when there are no prompts: the tokenizer's BOS, else the config's."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
        if isinstance(bos, (list, tuple)):
            bos = bos[0] if bos else None
    if bos is None:
        raise UserError("--data generated: the model's tokenizer and config name no beginning-of-sequence token to "
                        "start sequences from; give --prompts FILE")
    return int(bos)


def _stop_tokens(tokenizer, config) -> list[int]:
    """The end-of-sequence ids a sequence stops after: the tokenizer's EOS, else the config's (an id or a list)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return sorted({int(e) for e in eos}) if isinstance(eos, (list, tuple)) else [int(eos)]


def prefixes(tokenizer, config, prompts: Sequence[str] | None) -> list[list[int]]:
    """The token ids each sequence starts from: ``[BOS]``, or each prompt tokenised with the tokenizer's default
    special tokens (sequence n starts from prefix ``n % len(result)``)."""
    if not prompts:
        return [[_start_token(tokenizer, config)]]
    out = []
    for k, prompt in enumerate(prompts):
        ids = [int(i) for i in tokenizer(prompt)["input_ids"]]
        if not ids:
            raise UserError(f"--prompts: prompt {k + 1} of {len(prompts)} ({prompt[:40]!r}) has no tokens")
        out.append(ids)
    return out


def check_positions(name: str, config, lengths: Sequence[int], max_new_tokens: int, *, prompted: bool = True) -> None:
    """Refuse prompts (``lengths``: tokens per prefix) that, with ``max_new_tokens`` new tokens, run past the model's
    position table (GPT-2's ``n_positions``; rotary models such as Llama have no such bound)."""
    from gradmatch.kinds.causal_lm import position_overflow

    overflow = position_overflow(config, lengths, max_new_tokens)
    if overflow is not None:
        limit, key, longest = overflow
        start = (f"prompt {list(lengths).index(longest) + 1} of {len(lengths)} has {longest} tokens" if prompted
                 else "each sequence starts from 1 token (BOS)")
        advice = f"lower --max-length to at most {limit - longest}" if longest < limit else "shorten the prompts"
        raise UserError(f"--data generated: {start}, and with --max-length {max_new_tokens} new tokens that makes "
                        f"{longest + int(max_new_tokens)} positions, more than the {limit} of model {name} "
                        f"({key} {limit}): {advice}")


# --------------------------------------------------------------------------- sampling


def _takes(model: nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_of(out):
    """The KV cache a forward pass returned (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="seq", desc=desc, disable=not enabled, dynamic_ncols=True)


def sample_sequences(model: nn.Module, tokenizer, *, examples: int, max_new_tokens: int, prompts: list[str] | None,
                     seed: int, batch_size: int, indices: list[int] | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Sequences drawn from the causal LM ``model`` itself, one record per sequence n (0 .. ``examples`` - 1, or
    only ``indices``): ``{"index": n, "input_ids": prompt ids + new ids, "labels": -100 per prompt token, then the
    new ids}``.

    Sequence n starts from the BOS token, or from prompt ``n % len(prompts)`` (the tokenizer's default special
    tokens), and draws up to ``max_new_tokens`` tokens at temperature 1 with no top-k/top-p, stopping after an
    end-of-sequence token (kept: it is part of the sequence). Token t of sequence n is the inverse CDF (float64)
    of the softmax at the uniform ``example_uniforms(seed, n, max_new_tokens)[t]``, so the sequences depend on
    neither the batch size nor which other sequences are drawn with them. Batches run with the KV cache, prompts
    of different lengths padded on the left (attention mask and position ids).
    """
    config = model.config
    starts = prefixes(tokenizer, config, prompts)
    stop = _stop_tokens(tokenizer, config)
    wanted = list(range(int(examples))) if indices is None else [int(n) for n in indices]
    L = int(max_new_tokens)
    if L < 1:
        raise UserError(f"--max-length must be at least 1 (got {max_new_tokens})")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0  # what fills padded and finished slots: masked, never read
    device = next(model.parameters()).device
    stop_ids = torch.tensor(stop, dtype=torch.long, device=device)
    keep_last = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}
    cache_argument = "cache" if _takes(model, "cache") else "past_key_values"
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        with torch.no_grad(), _progress(len(wanted), progress, "sampling") as bar:
            for first in range(0, len(wanted), int(batch_size)):
                chunk = wanted[first:first + int(batch_size)]
                rows = [starts[n % len(starts)] for n in chunk]
                B, T0 = len(chunk), max(len(r) for r in rows)
                ids = torch.full((B, T0), pad, dtype=torch.long)
                mask = torch.zeros((B, T0), dtype=torch.long)
                for b, r in enumerate(rows):  # left padding
                    ids[b, T0 - len(r):] = torch.tensor(r, dtype=torch.long)
                    mask[b, T0 - len(r):] = 1
                ids, mask = ids.to(device), mask.to(device)
                position = (mask.cumsum(-1) - 1).clamp_(min=0)
                uniforms = torch.from_numpy(np.stack([example_uniforms(seed, n, L) for n in chunk])).to(device)
                new = torch.full((B, L), pad, dtype=torch.long, device=device)
                lengths = torch.zeros(B, dtype=torch.long, device=device)
                finished = torch.zeros(B, dtype=torch.bool, device=device)
                out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, **keep_last)
                next_position = position[:, -1:] + 1
                for t in range(L):
                    cdf = torch.softmax(out.logits[:, -1, :].to(torch.float64), dim=-1).cumsum(-1)
                    u = uniforms[:, t:t + 1] * cdf[:, -1:]
                    token = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
                    active = ~finished
                    new[:, t] = torch.where(active, token, torch.full_like(token, pad))
                    lengths += active.long()
                    if len(stop):
                        finished |= active & torch.isin(token, stop_ids)
                    if t == L - 1 or bool(finished.all()):
                        break
                    mask = torch.cat([mask, active.long().unsqueeze(-1)], dim=-1)
                    out = model(input_ids=new[:, t:t + 1], attention_mask=mask, position_ids=next_position,
                                use_cache=True, **{cache_argument: _cache_of(out)}, **keep_last)
                    next_position = next_position + 1
                new, lengths = new.cpu().tolist(), lengths.cpu().tolist()
                for b, n in enumerate(chunk):
                    drawn = new[b][:lengths[b]]
                    records.append({"index": n, "input_ids": rows[b] + drawn,
                                    "labels": [-100] * len(rows[b]) + drawn})
                bar.update(B)
    finally:
        model.train(was_training)
    return records


# --------------------------------------------------------------------------- the Fisher of the sampled sequences


def _batches(records: list[dict[str, Any]], collate, batch_size: int):
    """Padded batches (the causal-LM collator: right padding, labels padded with -100) with each sequence's index;
    sequences of similar lengths together (the sum does not depend on how they are batched)."""
    order = sorted(records, key=lambda r: -len(r["input_ids"]))
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        features = [{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]), "labels": r["labels"]}
                    for r in chunk]
        batch = dict(collate(features))
        batch[INDEX_KEY] = torch.tensor([r["index"] for r in chunk], dtype=torch.long)
        yield batch


def run_generated_fisher(model: str, *, out: str | os.PathLike, examples: int, max_length: int,
                         prompts: str | None = None, seed: int = 0, batch_size: int = 16, device: str | None = None,
                         overwrite: bool = False, progress: bool = True, kind: str | None = None,
                         out_dtype: str | None = None, gradient_checkpointing: bool = False,
                         shard: bool = False) -> Path:
    """The Fisher of causal LM ``model`` over its own distribution of sequences: draw ``examples`` sequences of up
    to ``max_length`` new tokens (from BOS, or continuing the prompts of the file ``prompts``: JSON Lines with
    "prompt" or "text", else one per line; see :func:`sample_sequences`), and write ``OUT/hessian/`` holding the
    mean of their squared per-sequence gradients of log p(new tokens | prompt), atomically.

    Under torchrun process r draws and scores sequences r, r + W, ...; the sums are all-reduced and rank 0 writes:
    the same sequences, and the same result up to float rounding, as one process. ``out_dtype`` and
    ``gradient_checkpointing`` as :func:`gradmatch.fisher.run.run_fisher`; ``shard`` is refused (each process
    samples its sequences with the whole model). Returns ``out``.
    """
    from gradmatch import __version__
    from gradmatch.checkpoints import folder_fingerprint
    from gradmatch.evaluate import read_prompts
    from gradmatch.finite import check_model
    from gradmatch.fsutil import atomic_dir
    from gradmatch.models import (
        BUILTIN_SPECS,
        kind_of,
        load_config,
        load_model,
        load_processor,
        resolve_model,
    )

    out = check_statistics_arguments(model, prompts, out, overwrite=overwrite, batch_size=batch_size,
                                     max_length=max_length, max_examples=None, device=device, seed=seed)
    if int(examples) < 1:
        raise UserError(f"--examples must be at least 1 (got {examples})")
    if shard:
        raise UserError("--shard does not apply to --data generated: sampling a sequence needs the whole model in "
                        "each process (FSDP would gather every layer for every new token, and processes whose "
                        "sequences end at different lengths would fall out of step); run it without --shard, "
                        "with --gradient-checkpointing to save memory")
    hessian_dtype(torch.float32, out_dtype)

    # Everything the user can get wrong is checked before the weights load (and before any output).
    name = str(model)
    config = load_config(name)
    model_kind = kind_of(name, kind)
    if model_kind.name != _CAUSAL_LM:
        raise UserError(f"--data generated samples sequences from a causal language model; {name} is a "
                        f"{model_kind.name} model")
    if name not in BUILTIN_SPECS:
        model_kind.check_head(name, config, "sampling sequences (--data generated)", _NO_LM_HEAD)
    if gradient_checkpointing:
        check_checkpointable(config, model_kind, name)
    texts = read_prompts(str(prompts)) if prompts is not None else None
    tokenizer = load_processor(name, kind=model_kind)
    check_positions(name, config, [len(p) for p in prefixes(tokenizer, config, texts)], int(max_length),
                    prompted=texts is not None)

    net, processor = load_model(name, kind=model_kind)
    check_model(net, name, "the Fisher (sampling sequences from it)")
    with distributed_run(device) as (rank, world, device):
        fingerprint = model_fingerprint(net) if rank == 0 else None
        source = Path(resolve_model(name)) if name not in BUILTIN_SPECS else None
        weights = folder_fingerprint(source) if rank == 0 and source is not None and source.is_dir() else None
        net.to(device)
        indices = list(range(rank, int(examples), world))
        shown = progress and rank == 0  # rank 0's share
        records = sample_sequences(net, processor, examples=int(examples), max_new_tokens=int(max_length),
                                   prompts=texts, seed=seed, batch_size=int(batch_size), indices=indices,
                                   progress=shown)
        tokens = sum(sum(1 for y in r["labels"] if y != -100) for r in records)
        # The table's "generated" entry scores the data's own targets (as "empirical" does): here the sampled
        # tokens themselves; the prompt's labels are -100, so only the new tokens are scored.
        acc = FisherAccumulator(net, kind=model_kind, estimator="generated", seed=seed,
                                gradient_checkpointing=gradient_checkpointing)
        with acc.attached(), _progress(len(records), shown, "fisher") as bar:
            for batch in _batches(records, model_kind.collator(processor), int(batch_size)):
                bar.update(acc.add(batch))
        if world > 1:
            import torch.distributed as dist

            acc.all_reduce()
            total = torch.tensor([tokens], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            tokens = int(total.item())
        fisher = acc.mean(in_place=True)
        dtype = hessian_dtype(net, out_dtype)
        if rank == 0:
            metadata = {
                "estimator": "generated", "num_examples": acc.count, "examples": int(examples),
                "max_length": int(max_length), "num_tokens": tokens,
                "prompts": str(prompts) if prompts is not None else None,
                "num_prompts": len(texts) if texts is not None else 0, "seed": int(seed),
                "model": name, "kind": model_kind.name, "model_fingerprint": fingerprint,
                "weights_fingerprint": weights, "num_processes": world, "sharded": False,
                "dtype": str(dtype).removeprefix("torch."), "gradient_checkpointing": bool(gradient_checkpointing),
                "quantity": QUANTITY, "gradmatch_version": __version__,
            }
            with atomic_dir(out, overwrite) as tmp:
                write_hessian(net, fisher, tmp / "hessian", metadata, dtype)
    return Path(out)
