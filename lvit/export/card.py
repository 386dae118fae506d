"""The model card (`README.md`) of an export: what it is made of, how it was trained and checked, how to
load it."""

from __future__ import annotations

from pathlib import Path

from lvit.export.serving import serving_lines
from lvit.model.next import stock_class
from lvit.runs.files import PATH_KEYS, RECIPE_FILE, RUN_INFO_FILE, is_hub_id, portable

_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

_LOAD_SNIPPET = """
import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, AutoProcessor, {model_class}

path = "{path}"
model = {model_class}.from_pretrained(path, dtype=torch.{dtype}, device_map="auto")
processor = AutoProcessor.from_pretrained(path)
# the PIL image processor it was trained with (transformers takes torchvision's whenever it is installed)
processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")

# as in training: EXIF orientation applied, transparency composited over white
rgba = ImageOps.exif_transpose(Image.open("image.jpg")).convert("RGBA")
image = Image.new("RGB", rgba.size, "white")
image.paste(rgba, mask=rgba.getchannel("A"))

{prompt}
# the prompt starts with the BOS token already: the tokenizer must not add another
inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
inputs = inputs.to(model.device, model.dtype)
out = model.generate(**inputs, max_new_tokens=128, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
"""
_CHAT_PROMPT = """
messages = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
""".strip()
_PLAIN_PROMPT = """
# a stage-1 model, trained on the `plain` template: the image, then its caption
prompt = processor.tokenizer.bos_token + "<image>"
""".strip()


def _trainer_summary(run) -> dict | None:
    state = run.trainer_state()
    if state is None:
        return None
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    return {"global_step": state.get("global_step"), "last_logged_loss": losses[-1] if losses else None}


def model_card(run, result, out: Path) -> str:
    """The README.md of the export `result` (an `lvit.export.exporter.ExportResult`) of `run`, to be placed at `out`."""
    recipe, info = run.recipe, run.info
    stage = "stage 1 (align: only the projector trained)" if recipe.stage == "align" else "stage 2 (finetune)"
    method = {"align": "projector only", "full": "full fine-tune", "lora": "LoRA", "qlora": "QLoRA (4-bit NF4 base)"}
    checkpoint = run.path.name if run.is_checkpoint else None
    hub_ids = [m for m in (recipe.model.vision_tower, recipe.model.language_model) if is_hub_id(m)]
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [llava, lvit]"]
    if hub_ids and not result.projector_only:
        front.append("base_model: [" + ", ".join(hub_ids) + "]")
    front.append("---")
    model_name = "LLaVA-NeXT model (AnyRes)" if recipe.model.architecture == "llava_next" else "LLaVA model"
    what = f"projector of a {model_name}" if result.projector_only else model_name
    lines = [
        *front,
        "",
        f"# {out.name}",
        "",
        f"A {what} trained with lvit and exported by `lvit export`"
        + (" (`--projector-only`)." if result.projector_only else "."),
        "",
        "| | |",
        "|---|---|",
        f"| vision tower | `{portable(recipe.model.vision_tower)}` "
        f"(feature layer {recipe.model.vision_feature_layer}) |",
        f"| language model | `{portable(recipe.model.language_model)}` |",
        f"| projector | `{recipe.model.projector}`"
        + (f", initialised from `{portable(recipe.model.projector_from)}`" if recipe.model.projector_from else "")
        + " |",
        f"| stage / method | {stage} / {method[run.kind]} |",
        f"| template | `{recipe.data.template}` |",
        _data_row(recipe.data),
        f"| source run | `{portable(run.path.resolve())}`"
        + (f" ({checkpoint}, an intermediate checkpoint)" if checkpoint else "")
        + " |",
        f"| weights | {result.dtype}" + ("" if result.projector_only else ", safetensors") + " |",
    ]
    if result.image_processor:
        lines += [
            f"| image processor | `{result.image_processor}` (the PIL backend, as in training and in LLaVA) |",
            "| images | EXIF orientation applied, transparency composited over white (LLaVA does neither) |",
        ]
    lines += [
        "",
        "## Training metrics",
        "",
    ]
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.6g} |" for k, v in metrics.items())]
    else:
        lines.append(f"None recorded in `{RUN_INFO_FILE}` (an intermediate checkpoint, or an unfinished run).")
    state = _trainer_summary(run)
    if state:
        lines += [
            "",
            f"Trainer state: global step {state['global_step']}, last logged loss {state['last_logged_loss']}.",
        ]
    if info.get("skipped_records"):
        lines += [
            "",
            f"{info['skipped_records']} record(s) were left out of training (invalid or too long); "
            "the run folder's skipped_records.jsonl lists each with its reason.",
        ]
    checked = "projector outputs" if result.projector_only else "logits"
    trained = "the 4-bit base + adapter" if run.kind == "qlora" else "the run's model"
    lines += [
        "",
        "## Self-check",
        "",
        f"{trained.capitalize()} as trained and this export as written (reloaded with plain "
        f"`from_pretrained`) were run on {result.sample}. "
        f"Largest absolute difference of the {checked}: **{result.max_abs_diff:.3g}** "
        f"(tolerance {result.tolerance:.3g}).",
        "",
        "## How to load it",
        "",
    ]
    if result.projector_only:
        lines += [
            "This folder holds only the projector (`projector.safetensors`: `linear_1.weight`, `linear_1.bias`, "
            "`linear_2.weight`, `linear_2.bias`). Start a stage-2 run from it:",
            "",
            "```yaml",
            "model:",
            f"  vision_tower: {portable(recipe.model.vision_tower)}",
            f"  language_model: {portable(recipe.model.language_model)}",
            f"  projector: {recipe.model.projector}",
            f"  projector_from: path/to/{out.name}",
            "```",
        ]
    else:
        prompt = _PLAIN_PROMPT if recipe.data.template == "plain" else _CHAT_PROMPT
        lines += [
            "Plain transformers (no lvit, no peft, no `trust_remote_code`). Load the image processor with "
            '`backend="pil"`: a plain `AutoProcessor.from_pretrained` takes the torchvision one whenever '
            "torchvision is installed, and its pixels differ from the PIL ones the model was trained on.",
            "",
            "```python",
            _LOAD_SNIPPET.format(
                path=f"path/to/{out.name}",
                dtype=_TORCH_DTYPE[result.dtype],
                prompt=prompt,
                model_class=stock_class(recipe.model.architecture).__name__,
            ).strip(),
            "```",
            *serving_lines(out.name, recipe, result.gguf),
        ]
    recipe_text = run.recipe_path.read_text(encoding="utf-8").rstrip()
    for value in sorted({str(v) for v in _local_paths(recipe)}, key=len, reverse=True):
        recipe_text = recipe_text.replace(value, portable(value))
    lines += ["", "## Recipe", "", f"The run's `{RECIPE_FILE}`, local paths shortened:", "", "```yaml", recipe_text]
    lines += ["```", ""]
    return "\n".join(lines)


def _local_paths(recipe) -> list[str]:
    """The recipe's model and data values that are local paths (what `portable` shortens)."""
    values = [getattr(getattr(recipe, section), key) for section, key in PATH_KEYS]
    return [v for v in values if v and portable(v) != v]


def _data_row(data) -> str:
    """The card's data row: the file and image folder, or a mixture's sources with what each epoch drew of them."""
    if data.sources is None:
        return f"| data | `{portable(data.path)}` (images: `{portable(data.image_folder)}`) |"
    parts = []
    for s in data.sources:
        given = [f"{k} {getattr(s, k):g}" for k in ("weight", "count", "fraction") if getattr(s, k) is not None]
        amount = given[0] if given else "all"
        parts.append(f"`{portable(s.path)}` ({amount})")
    return f"| data | a mixture: {', '.join(parts)} |"
