"""The export's self-check: one image-bearing sample, the logits (or projector outputs) of two models on
it, and how far apart they may be.

The run's model *as trained* (`lvit.infer.load.load_trained`: for QLoRA the 4-bit base + the adapter) and
the export *as written* (reloaded from disk with plain `from_pretrained`) see the same sample, built
with the run's template; the largest absolute difference must stay within a tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lvit.data.images import ImageLoader
from lvit.data.mixture import checked_source
from lvit.data.reader import first_records
from lvit.errors import LvitError
from lvit.model.encoder import conversation_encoder
from lvit.model.hub import resolve_source
from lvit.model.processor import load_tokenizer
from lvit.templates.builtin import CHAT_TEMPLATES
from lvit.templates.conversation import Conversation, chat_messages

# Self-check tolerances on the largest absolute logit difference (trained model vs written export).
# Measured on the tests' tiny model (2+2 layers, 3-4 steps; its logits reach |1|):
#
#   export dtype     align   full    lora     qlora (4-bit base, bf16 compute)
#   fp32             0       0       2.4e-7   2.5e-3 .. 3.0e-3
#   bf16             2.3e-3  2.5e-3  2.3e-3   2.4e-3 .. 4.7e-3
#   fp16             2.4e-4  2.9e-4  2.8e-4   2.4e-3 .. 2.9e-3
#   broken export: adapters left out 0.93 (lora) / 1.1 (qlora); qlora merged into re-quantized weights 0.13
#   (docs/stack-notes.md#qlora-merge-dequantized).
#
# Everything in fp32 (fp32 run, fp32 export; qlora with fp32 compute): the export holds the very weights
# the run computes with, or the adapters merged in fp32 (W + s*B@A once instead of per forward); only
# float reassociation differs -> 1e-4, plus 1e-5 of the largest logit for deep models with large logits.
#
# Anything in 16 bits -- the export's weights (--dtype bf16/fp16), a run loaded in 16 bits, or a qlora
# run whose 4-bit layers compute in bf16 (QLoRA's default: the trained model rounds inputs and
# dequantized weights to 8 mantissa bits, the export computes the same dequantized weights in fp32) --
# rounds every layer, and the error grows with depth and with the size of the logits: a fixed absolute
# bound cannot fit both a tiny model and a 13B one. So 16-bit tolerances are `absolute + relative *
# max|logit of the trained model|`: bf16 (2^-9 relative rounding) 0.05 + 5%, fp16 (2^-12) 0.01 + 1%.
# On the tiny model that is ~0.1 for bf16: 20-40x above what was measured, 10x below a broken export,
# which moves logits by about their whole size (a missing adapter or projector, a wrong base).
_FP32_TOLERANCE = (1e-4, 1e-5)
_16BIT_TOLERANCE = {torch.bfloat16: (0.05, 0.05), torch.float16: (0.01, 0.01)}
_PROJECTOR_TOLERANCE = 1e-5  # projector-only, same dtype: the written tensors are the trained ones


def default_tolerance(
    kind: str,
    export_dtype: torch.dtype,
    run_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    logit_scale: float = 0.0,
) -> float:
    """The default self-check tolerance of a whole-model export (see the tables above).

    `run_dtype`: the dtype the run's parts were loaded in; `compute_dtype`: the 4-bit layers' compute
    dtype (qlora only); `logit_scale`: the largest absolute logit of the trained model.
    """
    absolute, relative = _FP32_TOLERANCE
    tolerance = absolute + relative * logit_scale
    lossy = {export_dtype, run_dtype} | ({compute_dtype} if kind == "qlora" else set())
    for dtype in lossy & _16BIT_TOLERANCE.keys():
        absolute, relative = _16BIT_TOLERANCE[dtype]
        tolerance = max(tolerance, absolute + relative * logit_scale)
    return tolerance


def projector_tolerance(export_dtype: torch.dtype, trained_dtype: torch.dtype, output_scale: float) -> float:
    """The default self-check tolerance of a projector-only export: the trained tensors as they are, or
    rounded to 16 bits (`output_scale`: the largest absolute projector output of the trained projector)."""
    if export_dtype != trained_dtype and export_dtype in _16BIT_TOLERANCE:
        absolute, relative = _16BIT_TOLERANCE[export_dtype]
        return absolute + relative * output_scale
    return _PROJECTOR_TOLERANCE


# --- the sample ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    input_ids: torch.Tensor
    image_inputs: dict
    """`ImageLoader.image_inputs`: `pixel_values`, and `image_sizes` for LLaVA-NeXT."""
    description: str


SYNTHETIC_QUESTION = "What is in the picture?"
SYNTHETIC_ANSWER = "A red square in the top left."
_MAX_RECORDS_SCANNED = 200


def build_sample(run, processor, config) -> Sample:
    """One image-bearing prompt built with the run's template: the first usable record of the run's data
    (its first exchange), else a synthetic image with a fixed question and answer."""

    data = checked_source(run.recipe.data, str(run.path))
    encoder = conversation_encoder(data.template, processor.tokenizer, config)
    loader = ImageLoader(processor.image_processor, data.image_folder, data.image_aspect_ratio)
    for record in image_records(data):
        conv = Conversation(turns=record.conversation.turns[:2], has_image=True, system=record.conversation.system)
        if len(record.images) > 1 and not conv.images_inline:  # its images are all in later turns
            continue
        try:
            images = [loader.load(image) for image in record.images[: conv.num_images]]
            encoded = encoder.encode(encoder.sized(conv, [(i.height, i.width) for i in images]))
        except Exception:  # unreadable image, or a record the template rejects: try the next one
            continue
        if encoded.image_end > data.max_length:
            continue
        ids = encoded.input_ids[: data.max_length]
        return Sample(
            torch.tensor([ids]), loader.image_inputs(images), f"record {record.id!r} of {data.path}, {len(ids)} tokens"
        )
    conv = Conversation(turns=[("user", SYNTHETIC_QUESTION), ("assistant", SYNTHETIC_ANSWER)], has_image=True)
    image = synthetic_image(config.vision_config.image_size)
    ids = encoder.encode(encoder.sized(conv, [(image.height, image.width)])).input_ids
    return Sample(
        torch.tensor([ids]),
        loader.image_inputs([image]),
        f"a synthetic image and a fixed question (no readable image record in {data.path}), {len(ids)} tokens",
    )


def image_records(data) -> Iterator:
    """Image records of the run's data, in any format lvit reads (the same reader as training)."""
    try:
        records = first_records(data.path, data.format, _MAX_RECORDS_SCANNED)
    except (LvitError, OSError, UnicodeDecodeError, ValueError):
        return
    yield from (r for r in records if r.image is not None)


def synthetic_image(size: int = 224, width: int | None = None):
    """A deterministic test image: a red square on a white background, `size` high and `width` (default `size`)
    wide."""
    from PIL import Image, ImageDraw

    size = max(size, 16)
    image = Image.new("RGB", (width or size, size), "white")
    ImageDraw.Draw(image).rectangle([size // 8, size // 8, size // 2, size // 2], fill="red")
    return image


# --- what is compared ---------------------------------------------------------------------------------------


@torch.no_grad()
def logits(model, sample: Sample, device: str) -> torch.Tensor:
    """The model's logits on the sample, in fp32 on the CPU (a LLaVA model or a peft model around one)."""
    model.eval()
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    pixel_dtype = next(llava.model.vision_tower.parameters()).dtype
    ids = sample.input_ids.to(device)
    images = {k: v.to(device) for k, v in sample.image_inputs.items()}
    images["pixel_values"] = images["pixel_values"].to(pixel_dtype)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **images, use_cache=False)
    return out.logits.float().cpu()


@torch.no_grad()
def projector_outputs(llava, trained_projector, written_projector, sample: Sample, device: str):
    """`(trained, written)`: both projectors' outputs, in fp32 on the CPU, for the vision features `llava`'s
    tower gives the sample's image (its configured feature layer; CLS dropped with the "default" strategy)."""
    config = llava.config
    vision = llava.model.vision_tower
    pixel_values = sample.image_inputs["pixel_values"]
    if pixel_values.dim() == 5:  # LLaVA-NeXT: (images, tiles, ...): every tile
        pixel_values = pixel_values.flatten(0, 1)
    pixel_values = pixel_values.to(device=device, dtype=next(vision.parameters()).dtype)
    hidden = vision(pixel_values, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    features = (hidden if config.vision_feature_select_strategy == "full" else hidden[:, 1:]).float().cpu()
    return copy.deepcopy(trained_projector).float().cpu()(features), written_projector(features)


def max_abs_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got - ref).abs().max().item()


# --- the ids: training vs the exported chat template --------------------------------------------------------

_ID_CHECK_RECORDS = 8


def check_chat_template_ids(run, processor, config) -> int:
    """Compare, on the first records of the run's data (else a synthetic one), the ids training builds
    (the run's template with the recipe's tokenizer, as `lvit.model.processor.load_tokenizer` loads it) with the ids
    `processor.apply_chat_template(..., tokenize=True)` builds (`processor`: the export as written, reloaded),
    for the whole conversation and for the generation prompt of its first question. Returns how many
    conversations were compared; raises `LvitError` at the first difference."""

    data = checked_source(run.recipe.data, str(run.path))
    tokenizer = load_tokenizer(resolve_source(run.recipe.model.language_model, "model.language_model", run.path))
    encoder = conversation_encoder(data.template, tokenizer, config)
    side = config.vision_config.image_size
    image = synthetic_image(side, side * 3 // 2)  # only its size matters: the image token count (LLaVA-NeXT's)
    # vicuna_v1 and auto (the LM's own template): the processor's; plain: passed explicitly
    chat_template = CHAT_TEMPLATES["plain"] if data.template == "plain" else None
    synthetic = Conversation(turns=[("user", SYNTHETIC_QUESTION), ("assistant", SYNTHETIC_ANSWER)], has_image=True)
    convs = [(f"record {r.id!r}", r.conversation) for r in _records(data)] or [("a synthetic sample", synthetic)]
    compared = 0
    for where, conv in convs:
        conv = encoder.sized(conv, [(image.height, image.width)] * conv.num_images)
        try:
            trained = encoder.encode(conv)
        except ValueError:  # a record the template refuses: training leaves it out too
            continue
        compared += 1
        prompt = Conversation(conv.turns[:1], conv.has_image, conv.system)
        prompt = encoder.sized(prompt, [(image.height, image.width)] * prompt.num_images)
        for what, ids, c, generation in (
            ("the training sample", trained.input_ids, conv, False),
            ("the generation prompt", encoder.encode(prompt, for_generation=True).input_ids, prompt, True),
        ):
            messages = chat_messages(c, ([image] * c.num_images if c.images_inline else image) if c.has_image else None)
            got = processor.apply_chat_template(
                messages, chat_template=chat_template, add_generation_prompt=generation, tokenize=True
            )
            got = list(got[0])
            if got != ids:
                i = next((k for k, (a, b) in enumerate(zip(ids, got, strict=False)) if a != b), min(len(ids), len(got)))
                show = tokenizer.convert_ids_to_tokens
                raise LvitError(
                    f"lvit export: self-check failed for {run.path}: for {where} of {data.path}, the exported "
                    f"processor's chat template (`apply_chat_template(..., tokenize=True)`) gives other ids than "
                    f"training ({what}): from token {i}, training has {show(ids[i : i + 6])}, the chat template "
                    f"{show(got[i : i + 6])}; nothing was written. A model served from this export would be "
                    "given other ids than it was trained on: the tokenizer saved with the run must tokenize as the "
                    "recipe's model.language_model tokenizer does (see `lvit data preview`)."
                )
    return compared


def _records(data) -> list:
    try:
        return first_records(data.path, data.format, _ID_CHECK_RECORDS)
    except (LvitError, OSError, UnicodeDecodeError, ValueError):
        return []
