"""The tokenizer and image processor of a LLaVA lvit builds, and the processor that joins them with the chat
template."""

from __future__ import annotations

from lvit.errors import LvitError
from lvit.model.towers import feature_select_strategy, has_cls_token, num_image_tokens
from lvit.templates.builtin import VICUNA_V1_CHAT_TEMPLATE
from lvit.templates.chat_template import exported_chat_template
from lvit.templates.conversation import IMAGE_PLACEHOLDER

PAD_TOKEN = "<pad>"


IMAGE_PROCESSOR_BACKEND = "pil"
"""The CLIP image processor backend lvit trains, infers and exports with: PIL, as LLaVA (whose
`CLIPImageProcessor` in transformers 4.x was the PIL one). transformers 5 picks its torchvision
backend whenever torchvision is installed, whatever a saved config says; the two differ by up to
about 0.2 in normalised pixel units in a side-by-side check
(docs/stack-notes.md#image-processor-backend)."""


def load_tokenizer(language_model: str):
    """The language model's tokenizer with LLaVA's image token and a pad token added if missing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(language_model)
    additions = []
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        additions.append(IMAGE_PLACEHOLDER)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if additions:
        tokenizer.add_special_tokens({"additional_special_tokens": additions})
    if getattr(tokenizer, "image_token", None) not in (None, IMAGE_PLACEHOLDER):
        # A tokenizer that names an image token of its own (Gemma 3: `<image_soft_token>`) would make
        # `LlavaProcessor` expand that one instead of `<image>` (docs/stack-notes.md#tokenizer-image-token).
        tokenizer.image_token = IMAGE_PLACEHOLDER
    tokenizer.padding_side = "right"
    if hasattr(tokenizer, "legacy"):
        # transformers 5.24 saves a Llama tokenizer without its `legacy` flag (not kept in `init_kwargs`),
        # so a legacy one reloads from the run or the export as non-legacy and tokenizes differently
        # (docs/stack-notes.md#llama-legacy-dropped-on-save); kept, it is written to tokenizer_config.json.
        tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    check_round_trip(tokenizer, language_model)
    return tokenizer


def load_image_processor(source):
    """The PIL backend of the image processor saved at `source` (a hub id, or a model / run / export folder)."""
    from transformers import AutoImageProcessor
    from transformers.image_processing_backends import PilBackend

    image_processor = AutoImageProcessor.from_pretrained(source, backend=IMAGE_PROCESSOR_BACKEND)
    if not isinstance(image_processor, PilBackend):  # transformers falls back to another backend if it has no PIL one
        raise LvitError(
            f"{source}: its image processor ({type(image_processor).__name__}) has no PIL backend; "
            "lvit trains and runs LLaVA with the PIL CLIP image processor."
        )
    return image_processor


def load_processor(path):
    """A saved LLaVA processor with its image processor pinned to the PIL backend (`load_image_processor`).

    Not `AutoProcessor.from_pretrained(path, backend="pil")`: transformers 5.24 hands that keyword to
    the tokenizer too, which then reports `backend == "pil"` and saves it (docs/stack-notes.md#image-processor-backend).
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    processor.image_processor = load_image_processor(path)
    return processor


def check_round_trip(tokenizer, source: str = "") -> None:
    """Refuse a tokenizer that tokenizes differently once saved and loaded back (as the run and the export
    save it): the model would be given other ids at inference than in training."""
    import tempfile

    from transformers import AutoTokenizer

    probe = (
        f"{tokenizer.bos_token or ''}A chat. USER: {IMAGE_PLACEHOLDER}\nWhat is it? ASSISTANT: a red  square"
        f"{tokenizer.eos_token or ''}USER: \n  Why?\tok ASSISTANT:"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        reloaded = AutoTokenizer.from_pretrained(tmp)
    before = tokenizer(probe, add_special_tokens=False)["input_ids"]
    after = reloaded(probe, add_special_tokens=False)["input_ids"]
    if before != after:
        raise LvitError(
            f"the tokenizer of {source or 'the language model'} ({type(tokenizer).__name__}) tokenizes differently "
            f"after save_pretrained and from_pretrained ({tokenizer.convert_ids_to_tokens(before)[:12]} ... becomes "
            f"{reloaded.convert_ids_to_tokens(after)[:12]} ...): a model trained with it would be given other ids "
            "by the saved run and the export. Save the tokenizer once (`AutoTokenizer.from_pretrained(...)."
            "save_pretrained(folder)`) and point model.language_model's tokenizer files at that folder."
        )


def build_processor(image_processor, tokenizer, vision_config, template: str = "vicuna_v1"):
    """The LLaVA processor lvit saves: the tower's image-token count (checked against
    `num_image_tokens`) and the chat template that renders the training text (`template`: "auto" -> the
    LM's own chat template with the image placeholder handled, `lvit.templates.chat_template`; else vicuna_v1's)."""
    from transformers import LlavaProcessor

    strategy = feature_select_strategy(vision_config)
    chat_template = exported_chat_template(tokenizer) if template == "auto" else VICUNA_V1_CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        # The CLS token: the processor subtracts one for "default" (docs/stack-notes.md#processor-image-tokens)
        num_additional_image_tokens=1 if has_cls_token(vision_config) else 0,
        chat_template=chat_template,
    )
    if template == "auto":  # text-only users of the tokenizer (and servers that read its template) see the same
        tokenizer.chat_template = chat_template
    check_processor_image_tokens(processor, vision_config)
    return processor


def check_processor_image_tokens(processor, vision_config) -> None:
    """The processor expands `<image>` to as many tokens as the tower yields features, for an image of the
    size the image processor produces; refuse a tower whose processor crops to another size."""
    import numpy as np

    expected = num_image_tokens(vision_config)
    size = vision_config.image_size
    pixels = np.zeros((3, size, size), dtype=np.float32)
    got = len(processor.replace_image_token({"pixel_values": [pixels]}, 0))
    got //= len(processor.image_token)
    crop = _processed_size(processor.image_processor)
    if got != expected or (crop is not None and crop != size):
        raise LvitError(
            f"the vision tower ({vision_config.model_type}, {size} px, patch {vision_config.patch_size}) yields "
            f"{expected} image features but its image processor makes {crop} px images ({got} image tokens); "
            "the tower and its image processor must come from the same checkpoint."
        )


def _processed_size(image_processor) -> int | None:
    """The side of the square images the image processor outputs (its crop, else its fixed resize), if it says."""

    def height(size) -> int | None:  # a dict, or transformers' SizeDict
        value = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
        return None if value is None else int(value)

    crop, size = getattr(image_processor, "crop_size", None), getattr(image_processor, "size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None and height(crop):
        return height(crop)
    return height(size) if size is not None else None
