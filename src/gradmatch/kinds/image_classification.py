"""Image classifiers (``AutoModelForImageClassification``: ViT, ConvNeXt, ...): pixels in, labels out."""

from __future__ import annotations

from gradmatch.errors import UserError
from gradmatch.kinds._classifier import ClassifierKind

#: Model types that the image-classification mapping also lists but that are text encoders.
_TEXT_TYPES = {"bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta"}


def default_image_processor(config):
    """An image processor for a from-scratch image model: images at the model's size, scaled to [-1, 1]."""
    try:
        from transformers import ViTImageProcessorPil as _Processor  # no torchvision needed
    except ImportError:  # pragma: no cover - older transformers
        from transformers import ViTImageProcessor as _Processor
    size = int(getattr(config, "image_size", 224))
    channels = int(getattr(config, "num_channels", 3))
    return _Processor(size={"height": size, "width": size}, do_resize=True,
                      image_mean=[0.5] * channels, image_std=[0.5] * channels)


class ImageClassification(ClassifierKind):
    name = "image-classification"
    example_column = "image"
    priority = 20

    @classmethod
    def claims(cls, config) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

        archs = getattr(config, "architectures", None) or []
        model_type = getattr(config, "model_type", None)
        if any(a.endswith("ForImageClassification") for a in archs):
            return True
        if any(a.endswith(("ForSequenceClassification", "ForCausalLM", "LMHeadModel")) for a in archs):
            return False
        return model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and model_type not in _TEXT_TYPES

    def auto_class(self):
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification

    def load_processor(self, source, config, name, *, from_scratch):
        from transformers import AutoImageProcessor

        if source is None:
            return default_image_processor(config)
        try:
            return AutoImageProcessor.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - no preprocessor_config.json, malformed, ...
            if from_scratch:
                return default_image_processor(config)
            raise UserError(f"model {name} has no usable image processor: {' '.join(str(exc).split())[:200]}") from exc

    def lora_settings(self):
        return {"modules_to_save": ["classifier"]}  # the new head is trained in full, as SEQ_CLS does for text

    def encode(self, dataset, processor, max_length, *, desc=None):
        from transformers import PreTrainedTokenizerBase

        if isinstance(processor, PreTrainedTokenizerBase):
            raise UserError("an image data set needs an image model (got a tokenizer)")
        mean = getattr(processor, "image_mean", None)
        mode = "L" if mean is not None and len(mean) == 1 else "RGB"

        def pixels(batch):
            images = [img.convert(mode) for img in batch["image"]]
            out = processor(images=images, return_tensors="np")
            return {"pixel_values": list(out["pixel_values"]), "labels": batch["label"]}

        encoded = dataset.map(pixels, batched=True, remove_columns=dataset.column_names, desc=desc or "preparing images")
        encoded.set_format("torch", columns=["pixel_values", "labels"])
        return encoded

    def collator(self, processor):
        from transformers import DefaultDataCollator

        return DefaultDataCollator()


KIND = ImageClassification()
