"""What a kind of model is: how it loads, encodes and batches its examples, the log-likelihood whose
per-example gradients make its Fisher, its loss and its metrics — one subclass of :class:`Kind` per file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from gradmatch.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Keys of a batch that are not model inputs.
LABEL_KEYS = ("labels", "label")
INDEX_KEY = "index"


def model_max_length(model, max_length: int) -> int:
    """``max_length`` capped at the model's number of position embeddings (when it has them)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(int(max_length), int(positions)) if positions else int(max_length)


class Kind:
    """One kind of model. Subclasses set the class attributes and implement the methods that raise here.

    train / evaluate / fisher / mismatch / the pipeline ask the kind and never test which kind it is.
    """

    #: The name users write (``kind:`` in configs, ``--kind``), e.g. ``causal-lm``.
    name: ClassVar[str]
    #: Which column holds the examples (``text`` or ``image``) and whether a ``label`` column is needed.
    example_column: ClassVar[str] = "text"
    needs_labels: ClassVar[bool] = True
    #: Order in which kinds are asked to claim a config (lowest first); the fallback kind has the highest.
    priority: ClassVar[int] = 50
    #: Whether models of this kind generate text (continuations of prompts).
    generates: ClassVar[bool] = False
    #: The metric that sums up an evaluation, and whether higher is better (for reports and plots).
    primary_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    #: What one example is, and its log-likelihood (for messages and the Fisher's metadata).
    unit: ClassVar[str] = "example"
    likelihood: ClassVar[str] = "log p(y|x)"

    # ------------------------------------------------------------------ detection and loading

    @classmethod
    def claims(cls, config) -> bool:
        """True when a Hugging Face config (its architectures, else its model type) is of this kind."""
        raise NotImplementedError

    def auto_class(self):
        """The ``transformers`` Auto class that builds models of this kind."""
        raise NotImplementedError

    def load_processor(self, source: str | None, config, name: str, *, from_scratch: bool):
        """The tokenizer or image processor of model ``name`` (found in ``source``; None for a built-in spec
        without files), ready for this kind."""
        raise NotImplementedError

    def prepare_config(self, config, *, num_labels: int | None, id2label: dict | None) -> bool:
        """Adjust a config before loading (e.g. the head size); True when the checkpoint's head must be resized."""
        return False

    def prepare_model(self, model, processor):
        """Last touches after loading (e.g. the pad token id of a causal LM); returns the model."""
        return model

    def check_head(self, name: str, config, purpose: str, alternatives: str = "fine-tune it first") -> None:
        """Refuse a checkpoint whose head cannot serve ``purpose`` (``evaluate``, ``fisher``) for this kind, saying
        what to do instead (``alternatives``)."""

    def check_trainable(self, name: str, config) -> None:
        """Refuse to fine-tune checkpoint ``name`` as this kind when it is a model of another kind (a causal LM as a
        classifier, a classifier or a bidirectional encoder as a causal LM). Unlike :meth:`check_head`, a
        checkpoint without this kind's head passes when training can give it one (BertModel → classifier)."""

    def check_generation(self, name: str, config, processor, prompts, max_new_tokens: int) -> None:
        """Refuse, before any model work, a generation this model cannot run (``prompts`` are the texts)."""
        raise UserError(f"a {self.name} model does not generate text (generation needs a causal language model)")

    def num_labels(self, config, labels: list[int] | None, given: int | None) -> int | None:
        """The size of the head for training on ``labels`` (None: the kind has no label head)."""
        return None

    def lora_settings(self) -> dict[str, Any]:
        """peft LoraConfig arguments this kind needs (task type, modules trained in full)."""
        return {}

    # ------------------------------------------------------------------ data

    def check_data(self, dataset, label: str, model_name: str) -> None:
        """The loaded split holds what this kind reads; one clear error otherwise."""
        columns = set(dataset.column_names)
        if self.example_column not in columns:
            other = "an image" if "image" in columns else "a text"
            raise UserError(f"data set {label} holds {other} column but {model_name} is a {self.name} model, "
                            f"which reads {self.example_column}s")
        if self.needs_labels and "label" not in columns:
            raise UserError(f"data set {label} has no 'label' column, which a {self.name} model needs")

    def encode(self, dataset, processor, max_length: int, *, desc: str | None = None):
        """Model inputs of a loaded split, in row order, unpadded (pad batches with :meth:`collator`)."""
        raise NotImplementedError

    def collator(self, processor):
        """A data collator that pads (or stacks) a list of encoded examples into a batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ likelihoods

    def log_likelihood(self, model, batch: Mapping[str, Any], *, targets, seed: int,
                       index: list[int]) -> torch.Tensor:
        """Σ_b log p(y_b | x_b) over the batch, a scalar to differentiate: the Fisher squares each example's
        gradient of its own term. ``targets`` (:class:`gradmatch.fisher.estimators.Targets`): ``DATA`` takes y
        from the data, ``MODEL`` draws it from the model, seeded by ``(seed, index[b])`` so that it does not
        depend on batching."""
        raise NotImplementedError

    def loss(self, model, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int, dict[str, float]]:
        """(Σ over the batch's examples of each example's loss, the number of examples, extra sums such as
        ``correct`` or ``tokens``). The per-example loss is the negative of :meth:`log_likelihood`'s term."""
        raise NotImplementedError

    def loss_metrics(self, sums: dict[str, float], count: int, loss_sum: float) -> dict[str, float]:
        """Metrics from the sums :meth:`loss` returned, over ``count`` examples."""
        return {}

    # ------------------------------------------------------------------ evaluation and training

    def evaluate(self, model, processor, dataset, *, batch_size: int, max_length: int, progress: bool,
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(metrics, one record per example) of ``model`` on a loaded split."""
        raise NotImplementedError

    def generate(self, model, processor, prompts, **settings) -> list[dict[str, Any]]:
        """Continuations of ``prompts`` (a kind that generates text overrides this)."""
        raise UserError(f"a {self.name} model does not generate text (generation needs a causal language model)")

    def trainer_metrics(self):
        """``compute_metrics`` for Hugging Face Trainer's evaluation during training, or None."""
        return None

    @staticmethod
    def model_inputs(batch: Mapping[str, Any], device) -> dict[str, Any]:
        """The batch without labels and indices, on ``device``."""
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()
                if k not in LABEL_KEYS and k != INDEX_KEY}

    @staticmethod
    def batch_size(batch: Mapping[str, Any]) -> int:
        first = next(v for k, v in batch.items() if k not in LABEL_KEYS and k != INDEX_KEY and hasattr(v, "shape"))
        return int(first.shape[0])
