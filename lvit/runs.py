"""Reading an lvit run folder (or one of its checkpoints) back as a model.

Every run folder and checkpoint holds `lvit_run.json` and `lvit_recipe.yaml` beside its weights:
- stage 1 (`align`): `projector.safetensors` (only the projector trained);
- stage 2 `full`: a stock LLaVA checkpoint (`model.safetensors`);
- stage 2 `lora` / `qlora`: a peft adapter (`adapter_model.safetensors`) holding the LoRA weights
  and the fully trained projector (`modules_to_save`).
For stage 1 and adapters, the frozen base is rebuilt from the recipe's `model` section (the same
deterministic assembly the run used), so the base parts must still be reachable.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lvit.errors import LvitError
from lvit.model import PROJECTOR_FILE, RUN_INFO_FILE
from lvit.recipe import Recipe, recipe_from_dict

RECIPE_FILE = "lvit_recipe.yaml"


@dataclass
class RunFolder:
    path: Path
    recipe: Recipe
    info: dict

    @property
    def kind(self) -> str:
        """ "align", "full", "lora" or "qlora"."""
        return "align" if self.recipe.stage == "align" else self.recipe.method


def read_run(path: str | Path) -> RunFolder:
    """Open a run folder or checkpoint; `LvitError` if it is not one lvit wrote."""
    path = Path(path)
    if not path.is_dir():
        raise LvitError(f"{path}: no such run folder")
    recipe_path, info_path = path / RECIPE_FILE, path / RUN_INFO_FILE
    if not recipe_path.is_file() or not info_path.is_file():
        if any(path.glob("checkpoint-*")):
            raise LvitError(
                f"{path} has no finished run files yet; pass one of its checkpoints "
                f"({', '.join(sorted(p.name for p in path.glob('checkpoint-*')))}) instead."
            )
        raise LvitError(f"{path} is not an lvit run folder (no {RECIPE_FILE} / {RUN_INFO_FILE}).")
    recipe = recipe_from_dict(yaml.safe_load(recipe_path.read_text()), str(recipe_path))
    return RunFolder(path, recipe, json.loads(info_path.read_text()))


def _base_model_section(run: RunFolder):
    # The projector comes from the run itself, not from the stage-1 folder it started from.
    return dataclasses.replace(run.recipe.model, projector_from=None)


def load_trained(path: str | Path, device: str | None = None):
    """The model as it trained (a 4-bit base + adapter for QLoRA), ready for generation.

    Returns `(model, processor, run)`; `model` is a `LlavaForConditionalGeneration` or a
    `PeftModel` around one.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run = read_run(path)
    processor = AutoProcessor.from_pretrained(run.path)
    # A full run, or a stage-1 *checkpoint* (the Trainer saves the whole model there; only the
    # finished stage-1 run folder holds just the projector).
    whole = (
        run.kind == "align" and not (run.path / PROJECTOR_FILE).is_file() and any(run.path.glob("model*.safetensors"))
    )
    if run.kind == "full" or whole:
        model = LlavaForConditionalGeneration.from_pretrained(run.path)
    else:
        from lvit.model import assemble, load_projector

        model, _ = assemble(
            _base_model_section(run),
            str(run.path),
            quantize_lm=run.kind == "qlora",
            compute_dtype=run.recipe.lora.compute_dtype,
        )
        if run.kind == "align":
            load_projector(model, str(run.path), run.recipe.model.projector, str(run.path))
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, run.path)
    model.eval()
    if device:
        model.to(device)
    return model, processor, run


def load_merged(path: str | Path, dtype: torch.dtype = torch.float32):
    """A stock `LlavaForConditionalGeneration` holding the run's trained weights, adapters merged.

    LoRA merges into the 16-bit base. QLoRA merges into the *dequantized* 4-bit base: the exact
    values its adapters were trained against, never into re-quantized weights. Returns
    `(model, processor, run)`.
    """
    from transformers import AutoProcessor

    run = read_run(path)
    if run.kind not in ("lora", "qlora"):
        model, processor, run = load_trained(path)
        return model.to(dtype), processor, run

    from peft import PeftModel

    from lvit.model import assemble
    from lvit.quant import dequantize_4bit_layers

    processor = AutoProcessor.from_pretrained(run.path)
    model, _ = assemble(
        _base_model_section(run),
        str(run.path),
        quantize_lm=run.kind == "qlora",
        compute_dtype=run.recipe.lora.compute_dtype,
    )
    if run.kind == "qlora":
        dequantize_4bit_layers(model, torch.float32)
        for attr in ("quantization_config", "_pre_quantization_dtype"):  # no longer 4-bit: say so
            model.config.text_config.__dict__.pop(attr, None)
    model = model.to(torch.float32)
    merged = PeftModel.from_pretrained(model, run.path).merge_and_unload()
    merged.eval()
    return merged.to(dtype), processor, run


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector's weights of a (merged or plain) LLaVA model, as `linear_1.weight`, ..."""
    return {k: v.detach().cpu().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}


__all__ = ["PROJECTOR_FILE", "RunFolder", "load_merged", "load_trained", "projector_state", "read_run"]
