"""Loading any folder lvit wrote (a run, a checkpoint, an export) or a stock LLaVA folder as a model.

- `load_trained`: a run or checkpoint as it trained (a 4-bit base + adapter for QLoRA);
- `load_merged`: a run or checkpoint as one stock `LlavaForConditionalGeneration` (`LlavaNext...` for a
  LLaVA-NeXT run), adapters merged;
- `load_model`: any of those folders, or an exported / stock LLaVA folder, ready for generation
  (`LoadedModel`: the model with the template and image handling it was trained with).

torch, transformers and peft are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from lvit.data.images import ImageLoader
from lvit.errors import LvitError
from lvit.model.assemble import assemble
from lvit.model.encoder import conversation_encoder
from lvit.model.next import load_newline, newline_of, stock_class, to_next
from lvit.model.processor import load_processor
from lvit.model.projector import load_projector
from lvit.model.quant import LLAVA_SKIP, bnb_config, dequantize_4bit_layers, disable_cpu_repacking
from lvit.runs.files import (
    BASE_MODEL_KEYS,
    BASE_MODEL_OPTION,
    RUN_INFO_FILE,
    RunFolder,
    is_run_folder,
    read_export_info,
    read_run,
)
from lvit.templates.encoder import ConversationEncoder

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "vicuna_v1"
"""The template of a stock LLaVA folder that does not say which it was trained with."""


def _open(run: RunFolder | str | Path) -> RunFolder:
    return run if isinstance(run, RunFolder) else read_run(run)


def _base_model_section(run: RunFolder):
    # The projector comes from the run itself, not from the stage-1 folder it started from.
    return dataclasses.replace(run.recipe.model, projector_from=None)


def check_base_parts(run: RunFolder) -> None:
    """The frozen base parts the run is rebuilt from must be where its recipe says; if a local folder is gone
    (moved, or a relative path from another folder), say so and name the option that points at its new place."""
    for key in BASE_MODEL_KEYS:
        value = getattr(run.recipe.model, key)
        local = value.startswith((".", "/", "~")) or value.count("/") > 1 or Path(value).is_absolute()
        if local and not Path(value).expanduser().is_dir():
            raise LvitError(
                f"{run.path}: the run's base model part model.{key} = {value!r} is not there (moved or deleted?); "
                f"it is rebuilt from it for this run kind ({run.kind}). Pass {BASE_MODEL_OPTION} {key}=PATH with "
                "the folder where it is now (the same weights the run trained with)."
            )


def _assemble_base(run: RunFolder):
    """The run's frozen base as it was assembled (a LLaVA-NeXT run's in `LlavaNextForConditionalGeneration`, its
    `image_newline` still to be loaded)."""
    check_base_parts(run)
    model, processor = assemble(
        _base_model_section(run),
        str(run.path),
        quantize_lm=run.kind == "qlora",
        compute_dtype=run.recipe.lora.compute_dtype,
        template=run.recipe.data.template,
    )
    if run.recipe.model.architecture == "llava_next":
        model, _ = to_next(model, processor, run.recipe.model.image_grid_pinpoints)
    return model


def load_trained(run: RunFolder | str | Path, device: str | None = None, masters: bool = False):
    """The model as it trained (a 4-bit base + adapter for QLoRA), in eval mode.

    Returns `(model, processor, run)`; `model` is a `LlavaForConditionalGeneration` or a
    `PeftModel` around one. Stage 1 and adapters rebuild the frozen base from the recipe's `model`
    section (the same deterministic assembly the run used), so its parts must still be reachable.
    The weights are in the recipe's `model.torch_dtype`, ready to compute with; with `masters` what trained is
    loaded as the run saved it, its fp32 master weights unrounded (lvit.train.precision): a full run wholly in
    fp32, the projector (and LoRA weights) of the other kinds in fp32 beside the base in its own dtype.
    """
    import torch

    run = _open(run)
    processor = load_processor(run.path)
    if run.holds_whole_model:
        model = stock_class(run.recipe.model.architecture).from_pretrained(
            run.path, **({"dtype": torch.float32} if masters else {})
        )
    else:
        model = _assemble_base(run)
        if masters:
            model.model.multi_modal_projector.float()
            if newline_of(model) is not None:  # LLaVA-NeXT's row ends: a master weight too
                newline_of(model).data = newline_of(model).data.float()
        if run.kind == "align":
            load_projector(model, str(run.path), run.recipe.model.projector, str(run.path))
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, run.path)
            if newline_of(model) is not None:
                load_newline(model, run.path)
    model.eval()
    if device:
        model.to(device)
    return model, processor, run


def load_merged(run: RunFolder | str | Path, dtype=None):
    """A stock `LlavaForConditionalGeneration` holding the run's trained weights, adapters merged, in `dtype`
    (default fp32), from the run's fp32 master weights: an fp32 export holds them unrounded.

    LoRA merges into the 16-bit base. QLoRA merges into the *dequantized* 4-bit base: the exact
    values its adapters were trained against, never into re-quantized weights. Returns
    `(model, processor, run)`.
    """
    import torch

    dtype = dtype or torch.float32
    run = _open(run)
    if run.kind not in ("lora", "qlora"):
        model, processor, run = load_trained(run, masters=True)
        return model.to(dtype), processor, run

    from peft import PeftModel

    processor = load_processor(run.path)
    model = _assemble_base(run)
    if run.kind == "qlora":
        dequantize_4bit_layers(model, torch.float32)
        for attr in ("quantization_config", "_pre_quantization_dtype"):  # no longer 4-bit: say so
            model.config.text_config.__dict__.pop(attr, None)
    model = model.to(torch.float32)
    merged = PeftModel.from_pretrained(model, run.path).merge_and_unload()
    if newline_of(merged) is not None:
        load_newline(merged, run.path)
    merged.eval()
    return merged.to(dtype), processor, run


# --- for generation -----------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to answer: the model, its processor and the pieces that build its prompts."""

    model: object
    processor: object
    template: str
    aspect_ratio: str
    description: str

    def encoder(self) -> ConversationEncoder:
        return conversation_encoder(self.template, self.processor.tokenizer, self.model.config)

    def image_loader(self, image_folder: str | Path | None = None):
        return ImageLoader(self.processor.image_processor, image_folder, self.aspect_ratio)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    path: str | Path, load_4bit: bool = False, device: str | None = None, base_model: dict[str, str] | None = None
) -> LoadedModel:
    """Load a run folder, a checkpoint or an exported / stock LLaVA folder for generation.

    `load_4bit` loads the language model in 4-bit NF4 (full runs and exported folders; a QLoRA run
    is 4-bit already). `base_model` (`--base-model`) says where a run's moved base parts are now.
    """
    path = Path(path)
    if not path.is_dir():
        raise LvitError(f"{path}: no such folder; pass an lvit run folder, a checkpoint or an exported LLaVA folder.")
    device = device or default_device()
    if is_run_folder(path):
        return _load_run(path, load_4bit, device, base_model)
    return _load_llava_folder(path, load_4bit, device)


def _load_run(path: Path, load_4bit: bool, device: str, base_model: dict[str, str] | None = None) -> LoadedModel:
    run = read_run(path, base_model)
    if load_4bit and run.kind in ("align", "lora"):
        raise LvitError(
            f"--load-4bit works on full runs and exported folders; {path} is a {run.kind!r} run. "
            f"Export it first (`lvit export {path} --out DIR`) and load that folder with --load-4bit."
        )
    if load_4bit and run.kind == "full":
        loaded = _load_llava_folder(path, True, device)
        loaded.template, loaded.aspect_ratio = run.recipe.data.template, run.recipe.data.image_aspect_ratio
        loaded.description = f"{path} (full run, language model loaded in 4-bit)"
        return loaded
    model, processor, run = load_trained(run)
    if run.kind == "qlora":
        disable_cpu_repacking(model)  # what load_lm_4bit does; kept in case a later step trains this model
    model.to(device)
    if run.kind == "align":
        log.warning("%s is a stage-1 (align) run: it answers every prompt with a caption of the image", path)
    return LoadedModel(
        model, processor, run.recipe.data.template, run.recipe.data.image_aspect_ratio, f"{path} ({run.kind} run)"
    )


def _load_llava_folder(path: Path, load_4bit: bool, device: str) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise LvitError(
            f"{path} is neither an lvit run folder (no {RUN_INFO_FILE}) nor a Hugging Face model folder "
            "(no config.json)."
        )
    model_type = _model_type(path)
    if model_type not in ("llava", "llava_next"):
        raise LvitError(
            f"{path} holds a {model_type or 'non-LLaVA'} model, not a LLaVA model: pass an lvit run folder or "
            "checkpoint, an `lvit export` folder, or a LLaVA model folder (a vision tower or a language model alone "
            "is a part a recipe joins: model.vision_tower, model.language_model)."
        )
    kwargs: dict = {}
    if load_4bit:
        kwargs.update(
            quantization_config=bnb_config(skip=LLAVA_SKIP), device_map={"": 0 if device == "cuda" else device}
        )
    try:
        processor = load_processor(path)
        model = stock_class(model_type).from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise LvitError(f"{path}: cannot be loaded as a LLaVA model with its processor: {exc}") from None
    if not load_4bit:
        model.to(device)
    model.eval()
    template, aspect_ratio = DEFAULT_TEMPLATE, "square"
    export_info = read_export_info(path)  # an `lvit export` says which recipe (template) its run trained with
    if export_info is not None:
        data = (export_info.get("recipe") or {}).get("data") or {}
        template, aspect_ratio = data.get("template", template), data.get("image_aspect_ratio", aspect_ratio)
    return LoadedModel(
        model, processor, template, aspect_ratio, f"{path} (LLaVA folder{', 4-bit' if load_4bit else ''})"
    )


def _model_type(path: Path) -> str | None:
    """The `model_type` of a model folder's `config.json`, or None when it has none (or is not JSON)."""
    import json

    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
