"""Causal language models (``AutoModelForCausalLM``: GPT-2, Llama, Qwen, Mistral, ...): one example is one
sequence, its log-likelihood Σ_i log p(x_i | x_<i) over its predicted tokens; perplexity; generation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradmatch.errors import UserError
from gradmatch.kinds._classifier import HEAD_SUFFIXES, example_uniforms
from gradmatch.kinds.base import Kind, model_max_length
from gradmatch.kinds.text_classification import load_tokenizer

#: Architecture name endings of a checkpoint with a language-modelling head.
LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def ensure_pad_token(tokenizer, name: str):
    """Tokenizers without a pad token (GPT-2's) pad with their end-of-sequence token; padded positions are
    masked out of every loss and likelihood by the attention mask, so its identity does not matter."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise UserError(f"model {name}: its tokenizer has no pad, end-of-sequence or unknown token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


#: Config keys of rotary position embeddings (RoPE: Llama, Qwen, Mistral, GPT-J, GPT-NeoX, Phi ...): positions are
#: computed, not looked up in a table, so a sequence may run past max_position_embeddings.
_ROTARY_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct", "partial_rotary_factor")


def position_limit(config) -> tuple[int, str] | None:
    """(the most tokens a sequence may have, the config key that says so) for a model whose positions are a learned
    table (GPT-2's ``n_positions``, OPT's or GPT-Neo's ``max_position_embeddings``): a longer sequence indexes past
    the table. None when positions are rotary or ALiBi, or the config gives no number."""
    if any(getattr(config, key, None) is not None for key in _ROTARY_KEYS) or getattr(config, "alibi", False):
        return None
    fields = config.to_dict() if hasattr(config, "to_dict") else {}
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = fields.get(key, getattr(config, key, None))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def position_overflow(config, lengths: Sequence[int], max_new_tokens: int) -> tuple[int, str, int] | None:
    """(the model's position limit, its config key, the longest of ``lengths``) when the longest prompt plus
    ``max_new_tokens`` runs past the model's position table; None when it fits or the model has no such table."""
    found = position_limit(config)
    if found is None or not lengths:
        return None
    limit, key = found
    longest = max(lengths)
    return (limit, key, longest) if longest + int(max_new_tokens) > limit else None


def check_positions(name: str, config, lengths: Sequence[int], max_new_tokens: int) -> None:
    """Refuse a generation whose longest prompt (``lengths``: tokens per prompt) plus ``max_new_tokens`` runs past
    the model's position table."""
    overflow = position_overflow(config, lengths, max_new_tokens)
    if overflow is not None:
        limit, key, longest = overflow
        which = lengths.index(longest) + 1
        advice = (f"lower generation.max_new_tokens to at most {limit - longest} or shorten the prompts"
                  if longest < limit else f"shorten the prompts to at most {max(1, limit - int(max_new_tokens))} tokens")
        raise UserError(f"generation: prompt {which} of {len(lengths)} has {longest} tokens, and with max_new_tokens "
                        f"{max_new_tokens} that makes {longest + int(max_new_tokens)} positions, more than the {limit} "
                        f"of model {name} ({key} {limit}): {advice}")


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(Σ NLL / tokens); ``inf`` where that overflows a float (a mean NLL above ~709 nats: a wrecked model, which
    a comparison should show as the worst, not fail on); NaN without tokens. Metrics files write both as strings
    (:mod:`gradmatch.finite`)."""
    if not tokens:
        return float("nan")
    mean = nll_sum / tokens
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams over all n-grams of all sequences (0 when there are none)."""
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class CausalLM(Kind):
    name = "causal-lm"
    example_column = "text"
    needs_labels = False
    priority = 10
    primary_metric = "perplexity"
    higher_is_better = False
    unit = "sequence"
    generates = True
    likelihood = "Σ_i log p(x_i | x_<i) over its predicted tokens"

    @classmethod
    def claims(cls, config) -> bool:
        archs = getattr(config, "architectures", None) or []
        if archs:
            return any(a.endswith(LM_SUFFIXES) for a in archs)
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)

        kind = getattr(config, "model_type", None)
        return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load_processor(self, source, config, name, *, from_scratch):
        if source is None:
            raise UserError(f"model {name} has no tokenizer")
        return ensure_pad_token(load_tokenizer(source, name), name)

    def prepare_model(self, model, processor):
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = processor.pad_token_id
        return model

    def prepare_config(self, config, *, num_labels=None, id2label=None) -> bool:
        if num_labels is not None:
            raise UserError(f"num_labels applies to classifiers; a {self.name} model has no label head")
        return False

    def check_head(self, name, config, purpose, alternatives=None):
        archs = list(getattr(config, "architectures", None) or [])
        if any(a.endswith(HEAD_SUFFIXES) for a in archs):
            raise UserError(f"model {name} is a classifier ({', '.join(archs)}), not a causal language model: "
                            f"{purpose} needs a language-modelling head")
        if archs and not any(a.endswith(LM_SUFFIXES) for a in archs):
            raise UserError(f"model {name} has no language-modelling head (its architecture is {', '.join(archs)})"
                            + (f": {alternatives}" if alternatives else ""))

    def check_trainable(self, name, config):
        """A classifier, or a bidirectional encoder (BERT, RoBERTa: a ...LMHeadModel of theirs would see the tokens
        it is trained to predict), is refused; a decoder body without an LM head (LlamaModel) gets a new one."""
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)

        archs = list(getattr(config, "architectures", None) or [])
        if any(a.endswith(HEAD_SUFFIXES) for a in archs):
            raise UserError(f"model {name} is a classifier ({', '.join(archs)}), not a causal language model: "
                            f"training a {self.name} model needs a language model (an architecture ending in "
                            f"ForCausalLM or LMHeadModel); train it as a classifier (drop kind)")
        if self.claims(config):
            return
        model_type = getattr(config, "model_type", None)
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
                model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_decoder", False)):
            return
        what = ", ".join(archs) or str(model_type)
        raise UserError(f"model {name} ({what}) is not a causal language model: training a {self.name} model needs "
                        f"a decoder with a language-modelling head (an architecture ending in ForCausalLM or "
                        f"LMHeadModel)" + (f"; {model_type} is a bidirectional encoder"
                                           if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else ""))

    def check_generation(self, name, config, processor, prompts, max_new_tokens):
        """The longest prompt (tokenised as :meth:`generate` does) plus ``max_new_tokens`` fits the model's
        position table (GPT-2's ``n_positions``; rotary models such as Llama have no such bound)."""
        if position_limit(config) is None:
            return
        lengths = [len(ids) for ids in processor(list(prompts), verbose=False)["input_ids"]]
        check_positions(name, config, lengths, max_new_tokens)

    def lora_settings(self):
        from peft import TaskType

        return {"task_type": TaskType.CAUSAL_LM}

    # ------------------------------------------------------------------ data

    def encode(self, dataset, processor, max_length, *, desc=None):
        """``input_ids``/``attention_mask`` (truncated to ``max_length``, the tokenizer's default special tokens)
        and ``labels`` (the same ids: the next-token targets are the text itself). Sequences with fewer than
        two tokens predict nothing and are left out."""
        from transformers import PreTrainedTokenizerBase

        if not isinstance(processor, PreTrainedTokenizerBase):
            raise UserError("a causal language model reads text (got an image processor)")
        if "text" not in dataset.column_names:
            raise UserError(f"a {self.name} model reads a 'text' column; the data has {', '.join(dataset.column_names)}")
        if any(t is None for t in dataset["text"]):
            raise UserError("the data has missing texts (null in the 'text' column)")

        def tokenize(batch):
            out = dict(processor(batch["text"], truncation=True, max_length=max_length))
            out["labels"] = [list(ids) for ids in out["input_ids"]]
            return out

        encoded = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc=desc or "tokenizing")
        short = sum(1 for ids in encoded["input_ids"] if len(ids) < 2)
        if short:
            import logging

            logging.getLogger(__name__).warning("note: %d of %d texts have fewer than 2 tokens and predict nothing; "
                                                "left out", short, len(encoded))
            encoded = encoded.filter(lambda row: len(row["input_ids"]) >= 2, desc="dropping one-token texts")
        if len(encoded) == 0:
            raise UserError("no text of the data has two tokens or more: nothing to predict")
        return encoded

    def encode_pairs(self, pairs, processor, max_length, *, loss: str = "answer", desc=None):
        """(context, continuation) pairs tokenised as lm-evaluation-harness scores them: trailing spaces of the
        context move to the continuation, context + continuation is tokenised once and the continuation is the
        tokens past the context's own; a sequence longer than ``max_length`` keeps its last tokens (the harness
        cuts contexts on the left). ``labels``: the continuation's tokens only (``loss="answer"``) or every token
        (``loss="text"``)."""
        import datasets
        from transformers import PreTrainedTokenizerBase

        if not isinstance(processor, PreTrainedTokenizerBase):
            raise UserError("a causal language model reads text (got an image processor)")
        rows = {"input_ids": [], "attention_mask": [], "labels": []}
        for context, continuation in pairs:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = list(processor(context + continuation)["input_ids"])
            start = len(processor(context)["input_ids"])
            if start >= len(whole):
                raise UserError(f"the answer {continuation!r} adds no token after its context (the tokenizer "
                                "merges it into the context's last token)")
            labels = whole if loss == "text" else [-100] * start + whole[start:]
            cut = max(0, len(whole) - int(max_length))
            rows["input_ids"].append(whole[cut:])
            rows["attention_mask"].append([1] * (len(whole) - cut))
            rows["labels"].append(list(labels[cut:]))
        return datasets.Dataset.from_dict(rows)

    def collator(self, processor):
        from transformers import DataCollatorForSeq2Seq

        # Pads input_ids with the pad token and labels with -100 (ignored), on the right.
        return DataCollatorForSeq2Seq(processor, label_pad_token_id=-100, padding=True)

    # ------------------------------------------------------------------ likelihoods

    @staticmethod
    def _shifted(model, batch: Mapping[str, Any]):
        """(logits predicting tokens 1..L-1, the true next tokens, their mask) of a right-padded batch."""
        import torch

        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)
        attention = batch.get("attention_mask")
        attention = torch.ones_like(ids) if attention is None else attention.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise UserError(f"the model's logits have shape {tuple(logits.shape)}; expected (batch, length, vocabulary)")
        mask = attention[:, 1:].bool()
        labels = batch.get("labels")
        if labels is not None:
            mask &= labels[:, 1:].to(device) != -100
        return logits[:, :-1], ids[:, 1:], mask

    def log_likelihood(self, model, batch, *, targets, seed, index):
        """Σ_b Σ_i log p(y_bi | x_b<i) over predicted positions; y = the text's next tokens (``Targets.DATA``) or
        each drawn from p(· | true prefix) (``Targets.MODEL``, seeded by (seed, example index) per position)."""
        import torch

        from gradmatch.fisher.estimators import Targets

        logits, next_tokens, mask = self._shifted(model, batch)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        log_probs = torch.log_softmax(logits.to(dtype), dim=-1)
        if targets is Targets.MODEL:
            next_tokens = self._sample(log_probs, mask, index, seed)
        elif targets is not Targets.DATA:
            raise TypeError(f"targets must be a Targets member, not {targets!r}")
        picked = log_probs.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum()

    @staticmethod
    def _sample(log_probs, mask, index: Sequence[int], seed: int):
        """Next tokens drawn by inverse CDF, one uniform per (example, position): independent of batching."""
        import torch

        targets = torch.zeros(mask.shape, dtype=torch.long, device=log_probs.device)
        for b in range(mask.shape[0]):  # one example at a time: a float64 CDF of (length, vocabulary)
            cdf = log_probs[b].detach().to(torch.float64).exp().cumsum(-1)
            u = torch.as_tensor(example_uniforms(seed, int(index[b]), mask.shape[1]), dtype=torch.float64,
                                device=cdf.device).unsqueeze(-1) * cdf[:, -1:]
            targets[b] = torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
        return targets

    def loss(self, model, batch):
        import torch

        logits, targets, mask = self._shifted(model, batch)
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        total = (nll * mask).sum()
        return total, int(mask.shape[0]), {"tokens": float(mask.sum())}

    def loss_metrics(self, sums, count, loss_sum):
        tokens = sums.get("tokens", 0.0)
        return {"perplexity": perplexity(loss_sum, tokens), "tokens": int(tokens)}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model, processor, dataset, *, batch_size, max_length, progress):
        """Corpus perplexity exp(Σ NLL / Σ predicted tokens) over the split; per sequence: tokens and NLL."""
        import torch
        from tqdm.auto import tqdm


        encoded = self.encode(dataset, processor, model_max_length(model, max_length), desc="preparing evaluation data")
        loader = torch.utils.data.DataLoader(encoded, batch_size=batch_size, shuffle=False,
                                             collate_fn=self.collator(processor))
        model.eval()
        records, total_nll, total_tokens = [], 0.0, 0
        with torch.no_grad():
            for batch in tqdm(loader, desc="perplexity", unit="batch", disable=not progress, leave=False):
                logits, targets, mask = self._shifted(model, batch)
                nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
                per_sequence = (nll.double() * mask).sum(1)
                for value, n in zip(per_sequence.tolist(), mask.sum(1).tolist()):
                    records.append({"index": len(records), "tokens": int(n), "nll": value})
                    total_nll += value
                    total_tokens += int(n)
        metrics = {"perplexity": perplexity(total_nll, total_tokens), "nll_per_token": total_nll / total_tokens,
                   "num_examples": len(records), "num_tokens": total_tokens}
        return metrics, records

    def generate(self, model, tokenizer, prompts: Sequence[str], *, num_samples: int = 1, max_new_tokens: int = 32,
                 do_sample: bool = True, top_p: float = 1.0, temperature: float = 1.0, seed: int = 0,
                 batch_size: int = 16, progress: bool = True) -> list[dict[str, Any]]:
        """``num_samples`` continuations of every prompt (greedy or seeded sampling): prompt, sample, continuation
        text and token ids. Batches of prompts are padded on the left; reproducible for a seed and batch size."""
        import torch
        from tqdm.auto import tqdm

        if position_limit(model.config) is not None:  # an IndexError deep in the model otherwise
            lengths = [len(ids) for ids in tokenizer(list(prompts), verbose=False)["input_ids"]]
            check_positions(getattr(model.config, "name_or_path", None) or "(in memory)", model.config, lengths,
                            max_new_tokens)
        model.eval()
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        out: list[dict[str, Any]] = []
        try:
            starts = range(0, len(prompts), batch_size)
            for n, start in enumerate(tqdm(starts, desc="generating", unit="batch", disable=not progress, leave=False)):
                chunk = list(prompts[start:start + batch_size])
                inputs = tokenizer(chunk, return_tensors="pt", padding=True).to(next(model.parameters()).device)
                torch.manual_seed((int(seed) * 1_000_003 + n) & 0x7FFFFFFF)
                try:
                    with torch.no_grad():
                        sequences = model.generate(
                            **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            top_p=top_p if do_sample else None, temperature=temperature if do_sample else None,
                            num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id,
                            top_k=0 if do_sample else None)
                except RuntimeError as exc:  # torch.multinomial on logits that overflowed
                    if "inf" not in str(exc) and "nan" not in str(exc):
                        raise
                    raise UserError(f"generation: the next-token probabilities of batch {n + 1} hold NaN or Inf (the "
                                    "model's logits overflow), so no token can be sampled; nothing was written") from None
                new = sequences[:, inputs["input_ids"].shape[1]:]
                stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
                for row, ids in enumerate(new.tolist()):
                    ids = next((ids[:i] for i, t in enumerate(ids) if t in stop), ids)  # up to the end of sequence
                    out.append({"prompt": chunk[row // num_samples], "sample": row % num_samples,
                                "continuation": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids})
        finally:
            tokenizer.padding_side = side
        return out


KIND = CausalLM()
