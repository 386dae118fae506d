"""`lvit export RUN_DIR --out DIR`: any lvit run (or checkpoint) as a stock, self-checked LLaVA folder.

One entry point for every kind of run folder lvit writes (`lvit.runs`): stage 1 (`align`), stage 2
`full`, `lora` and `qlora`, and their `checkpoint-N` folders.

- Default: the run's trained weights as a plain `LlavaForConditionalGeneration` + its processor,
  in (sharded) safetensors. Adapters are merged (QLoRA into the *dequantized* 4-bit base, see
  `lvit.runs.load_merged`); no peft wrapper, `lora_` or `modules_to_save` key is left, and the
  folder loads with plain transformers: no lvit, no peft, no `trust_remote_code`.
- `--projector-only`: just `projector.safetensors` (+ the run's `lvit_run.json` /
  `lvit_recipe.yaml`), a folder a stage-2 recipe's `model.projector_from` consumes.

Self-check: the run's model *as trained* (`lvit.runs.load_trained`: for QLoRA the 4-bit base + the
adapter) and the export *as written* (reloaded from disk with plain `from_pretrained`) see the same
image-bearing sample, built with the run's template; the largest absolute logit difference must
stay within a tolerance. The export is written into a temporary sibling folder and renamed into
place only once the check passed, so a failed or interrupted export never leaves a folder that
looks complete.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import typer

from lvit.errors import LvitError

EXPORT_INFO_FILE = "lvit_export.json"
README_FILE = "README.md"

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# A default of bf16 for whole-model exports: what LLaVA-1.5 trains and serves in on Ampere/Hopper GPUs,
# half the size of fp32 (a 13B model: about 26 GB instead of 52 GB), and with fp32's exponent range, so
# casting trained weights cannot overflow (fp16 can, above 65504). `--dtype fp16` for GPUs without bf16
# (V100, T4); `--dtype fp32` for a bit-exact copy of an fp32 run. A projector-only export keeps the
# projector's trained dtype by default: it is tiny and initialises further training.
DEFAULT_DTYPE = "bf16"

# Keys / module types that must not survive a merge (a peft wrapper or adapter left in the export).
_ADAPTER_KEY_MARKERS = ("lora_", "modules_to_save", "original_module", "base_layer", "lora_magnitude_vector")

# Self-check tolerances on the largest absolute logit difference (trained model vs written export).
# Measured on the tests' tiny model (2+2 layers, 3-4 steps; its logits reach |1|):
#
#   export dtype     align   full    lora     qlora (4-bit base, bf16 compute)
#   fp32             0       0       2.4e-7   2.5e-3 .. 3.0e-3
#   bf16             2.3e-3  2.5e-3  2.3e-3   2.4e-3 .. 4.7e-3
#   fp16             2.4e-4  2.9e-4  2.8e-4   2.4e-3 .. 2.9e-3
#   broken export: adapters left out 0.93 (lora) / 1.1 (qlora); STACK-NOTES: qlora merged into
#   re-quantized weights 0.13.
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


@dataclass
class ExportResult:
    path: Path
    kind: str
    """"align", "full", "lora" or "qlora" (the run's kind)."""
    dtype: str
    projector_only: bool
    max_abs_diff: float
    """The self-check's largest absolute difference (logits; projector outputs for --projector-only)."""
    tolerance: float
    sample: str
    """What the self-check ran on."""


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise LvitError(f"--dtype {name!r} is not supported; use bf16, fp16 or fp32.") from None


def default_tolerance(
    kind: str,
    export_dtype: torch.dtype,
    run_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    logit_scale: float = 0.0,
) -> float:
    """The default self-check tolerance (see the tables above).

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


def export(
    run_dir: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    projector_only: bool = False,
    tolerance: float | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    device: str | None = None,
    echo: Callable[[str], None] = typer.echo,
) -> ExportResult:
    """Export the run or checkpoint `run_dir` to `out`; returns what was written and the self-check.

    Raises `LvitError` (and leaves `out` untouched) if the run cannot be read, `out` is in the way,
    or the self-check fails.
    """
    from lvit.runs import read_run

    run_dir, out = Path(run_dir), Path(out)
    try:
        run = read_run(run_dir)
    except LvitError as exc:
        raise LvitError(
            f"lvit export: {exc}\nRUN_DIR must be the output folder of an `lvit finetune` run "
            "(its training.output_dir) or one of its checkpoint-N folders."
        ) from None
    if tolerance is not None and not tolerance >= 0:
        raise LvitError(f"--tolerance must be a number >= 0, got {tolerance}.")
    target_dtype = parse_dtype(dtype) if dtype is not None else (None if projector_only else DTYPES[DEFAULT_DTYPE])
    _check_shard_size(max_shard_size)
    _check_out_dir(out, run.path, overwrite)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise LvitError(f"--device {device}: no CUDA GPU is visible here; leave --device out to use the CPU.")

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted export of this same process id
    created = [p for p in reversed(tmp.parents) if not p.exists()]  # parent folders this export creates
    tmp.mkdir(parents=True)
    try:
        with _quiet_transformers():
            if projector_only:
                result = _export_projector(run, tmp, target_dtype, tolerance, device, echo)
            else:
                result = _export_model(run, tmp, target_dtype, tolerance, max_shard_size, device, echo)
        _write_export_info(tmp, run, result)
        _write_model_card(tmp, run, result, out)
        if not result.max_abs_diff <= result.tolerance:  # NaN fails too
            raise LvitError(
                f"lvit export: self-check failed for {run.path}: the export's "
                f"{'projector outputs' if projector_only else 'logits'} differ from the run's model by up to "
                f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g}, kind {result.kind}, dtype "
                f"{result.dtype}); nothing was written to {out}.\nIf the difference is expected (e.g. a 16-bit "
                "export of a model with large logits), pass a larger --tolerance, or --dtype fp32 to see the "
                "difference without 16-bit rounding; otherwise the run's base parts may have changed since "
                "training (the recipe's model.vision_tower / model.language_model must be the same weights)."
            )
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    result.path = out
    echo(f"exported {result.kind} run {run.path} -> {out} ({result.dtype})")
    return result


# --- whole model -------------------------------------------------------------------------------------------


def _export_model(run, tmp: Path, dtype, tolerance, max_shard_size, device: str, echo) -> ExportResult:
    from transformers import LlavaForConditionalGeneration

    merge = " (adapters merged)" if run.kind in ("lora", "qlora") else ""
    echo(f"[1/3] {run.kind} run {run.path}: writing a stock LLaVA model{merge} ({_SHORT[dtype]})")
    merged, processor, _ = _load_merged(run, dtype)
    _assert_no_adapters(merged, f"the merged model of {run.path}")
    _clean_config(merged.config, dtype)
    config = copy.deepcopy(merged.config)
    merged.save_pretrained(tmp, max_shard_size=max_shard_size)
    processor.save_pretrained(tmp)
    del merged
    gc.collect()
    _assert_no_adapter_keys(tmp)
    sample = build_sample(run, processor, config)

    echo(
        f"[2/3] self-check: the run's model as trained ({'4-bit base + adapter' if run.kind == 'qlora' else run.kind})"
    )
    trained, _, _ = _load_trained(run, device)
    if run.kind != "qlora":
        trained = trained.float()  # compare in fp32: a 16-bit run's weights upcast exactly
    ref = _logits(trained, sample, device)
    del trained
    gc.collect()

    echo(f"[3/3] self-check: the export as written, reloaded with plain from_pretrained in fp32 ({sample.description})")
    exported, info = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise LvitError(f"lvit export: the written model does not reload cleanly ({bad}); this is an lvit bug.")
    got = _logits(exported.to(device), sample, device)
    del exported
    gc.collect()

    diff = (got - ref).abs().max().item()
    if tolerance is None:
        recipe_model = run.recipe.model
        tolerance = default_tolerance(
            run.kind,
            dtype,
            getattr(torch, recipe_model.torch_dtype),
            getattr(torch, run.recipe.lora.compute_dtype) if run.kind == "qlora" else None,
            ref.abs().max().item(),
        )
    verdict = "ok" if diff <= tolerance else "FAIL"
    echo(f"self-check: max |logit difference| = {diff:.3g} (tolerance {tolerance:.3g}) {verdict}")
    return ExportResult(tmp, run.kind, _SHORT[dtype], False, diff, tolerance, sample.description)


def _load_merged(run, dtype):
    if _is_full_align_checkpoint(run):
        model, processor = _load_full_checkpoint(run)
        return model.to(dtype), processor, run
    from lvit.runs import load_merged

    return load_merged(run.path, dtype)


def _load_trained(run, device: str):
    if _is_full_align_checkpoint(run):
        model, processor = _load_full_checkpoint(run)
        return model.to(device), processor, run
    from lvit.runs import load_trained

    return load_trained(run.path, device=device)


def _is_full_align_checkpoint(run) -> bool:
    """A stage-1 checkpoint-N: the Trainer saved the whole (mostly frozen) LLaVA model, not the projector."""
    from lvit.model import PROJECTOR_FILE

    return (
        run.kind == "align" and not (run.path / PROJECTOR_FILE).is_file() and any(run.path.glob("model*.safetensors"))
    )


def _load_full_checkpoint(run):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(run.path)
    model.eval()
    return model, AutoProcessor.from_pretrained(run.path)


def _assert_no_adapters(model, what: str) -> None:
    wrappers = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")})
    keys = [k for k in model.state_dict() if any(marker in k for marker in _ADAPTER_KEY_MARKERS)]
    if wrappers or keys:
        raise LvitError(
            f"lvit export: {what} still holds adapter parts (modules {wrappers}, keys {keys[:5]}); "
            "this is an lvit bug: please report it with the run folder."
        )


def _assert_no_adapter_keys(folder: Path) -> None:
    for key in sorted(safetensors_keys(folder)):
        if any(marker in key for marker in _ADAPTER_KEY_MARKERS):
            raise LvitError(f"lvit export: the written weights hold an adapter key {key!r}; this is an lvit bug.")


def safetensors_keys(folder: str | Path) -> set[str]:
    """Every tensor name in the safetensors files of `folder`."""
    from safetensors import safe_open

    keys: set[str] = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    return keys


def _clean_config(config, dtype: torch.dtype) -> None:
    """A config that describes the written weights: no 4-bit settings, one dtype everywhere.

    A QLoRA base's language model was loaded with a `BitsAndBytesConfig`, which `LlavaConfig` keeps in
    `text_config`; the export holds ordinary dequantized weights, so it must not claim to be quantized.
    """
    for sub in (config, config.text_config, config.vision_config):
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if attr in sub.__dict__:
                delattr(sub, attr)
        sub.dtype = dtype


# --- projector only ----------------------------------------------------------------------------------------


def _export_projector(run, tmp: Path, dtype, tolerance, device: str, echo) -> ExportResult:
    from safetensors.torch import save_file

    from lvit.model import PROJECTOR_FILE, RUN_INFO_FILE, load_projector, new_projector
    from lvit.runs import RECIPE_FILE

    echo(f"[1/2] {run.kind} run {run.path}: the trained projector")
    trained, processor, _ = _load_trained(run, device)
    llava = trained.get_base_model() if hasattr(trained, "get_base_model") else trained
    projector = _unwrap_projector(llava.model.multi_modal_projector)
    state = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    trained_dtype = next(iter(state.values())).dtype
    dtype = dtype or trained_dtype
    save_file({k: v.to(dtype) for k, v in state.items()}, str(tmp / PROJECTOR_FILE))
    for name in (RUN_INFO_FILE, RECIPE_FILE):
        shutil.copy2(run.path / name, tmp / name)

    echo("[2/2] self-check: the written projector, loaded the way model.projector_from loads it")
    config = llava.config
    consumer = types.SimpleNamespace(model=types.SimpleNamespace(multi_modal_projector=None))
    consumer.model.multi_modal_projector = new_projector(config, run.recipe.model.projector, torch.float32)
    load_projector(consumer, str(tmp), run.recipe.model.projector, f"lvit export --projector-only {tmp}")
    sample = build_sample(run, processor, config)
    with torch.no_grad():
        vision = llava.model.vision_tower
        pixel_values = sample.pixel_values.to(device=device, dtype=next(vision.parameters()).dtype)
        hidden = vision(pixel_values, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        features = hidden[:, 1:].float().cpu()  # "default" strategy: CLS dropped
        ref = copy.deepcopy(projector).float().cpu()(features)
        got = consumer.model.multi_modal_projector(features)
    del trained, llava
    gc.collect()
    diff = (got - ref).abs().max().item()
    if tolerance is None:
        tolerance = _PROJECTOR_TOLERANCE
        if dtype != trained_dtype and dtype in _16BIT_TOLERANCE:
            absolute, relative = _16BIT_TOLERANCE[dtype]
            tolerance = absolute + relative * ref.abs().max().item()
    verdict = "ok" if diff <= tolerance else "FAIL"
    echo(f"self-check: max |projector output difference| = {diff:.3g} (tolerance {tolerance:.3g}) {verdict}")
    return ExportResult(tmp, run.kind, _SHORT.get(dtype, str(dtype)), True, diff, tolerance, sample.description)


def _unwrap_projector(module):
    """The projector a run computes with: for adapters, peft's active `modules_to_save` copy."""
    copies = getattr(module, "modules_to_save", None)
    if copies is None:
        return module
    active = module.active_adapter
    return copies[active if isinstance(active, str) else active[0]]


# --- the self-check's sample -------------------------------------------------------------------------------


@dataclass
class Sample:
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    description: str


SYNTHETIC_QUESTION = "What is in the picture?"
SYNTHETIC_ANSWER = "A red square in the top left."
_MAX_RECORDS_SCANNED = 200


def build_sample(run, processor, config) -> Sample:
    """One image-bearing prompt built with the run's template: the first usable record of the run's data
    (its first exchange), else a synthetic image with a fixed question and answer."""
    from lvit.data.images import ImageLoader
    from lvit.model import num_image_tokens
    from lvit.templates import Conversation, ConversationEncoder

    data = run.recipe.data
    encoder = ConversationEncoder(
        data.template, processor.tokenizer, config.image_token_id, num_image_tokens(config.vision_config)
    )
    loader = ImageLoader(processor.image_processor, data.image_folder, data.image_aspect_ratio)
    for record in _image_records(data):
        conv = Conversation(turns=record.conversation.turns[:2], has_image=True, system=record.conversation.system)
        try:
            encoded = encoder.encode(conv)
            image = loader.load(record.image)
        except Exception:  # unreadable image, or a record the template rejects: try the next one
            continue
        if encoded.image_end > data.max_length:
            continue
        ids = encoded.input_ids[: data.max_length]
        return Sample(
            torch.tensor([ids]), loader.pixel_values([image]), f"record {record.id!r} of {data.path}, {len(ids)} tokens"
        )
    conv = Conversation(turns=[("user", SYNTHETIC_QUESTION), ("assistant", SYNTHETIC_ANSWER)], has_image=True)
    ids = encoder.encode(conv).input_ids
    return Sample(
        torch.tensor([ids]),
        loader.pixel_values([synthetic_image(config.vision_config.image_size)]),
        f"a synthetic image and a fixed question (no readable image record in {data.path}), {len(ids)} tokens",
    )


def _image_records(data) -> Iterator:
    """Image records of the run's data, in any format lvit reads (the same reader as training)."""
    from lvit.data.records import read_records

    try:
        records, _, _ = read_records(data.path, fmt=data.format, image_folder=data.image_folder)
    except (LvitError, OSError, UnicodeDecodeError, ValueError):
        return
    yield from (r for r in records[:_MAX_RECORDS_SCANNED] if r.image is not None)


def synthetic_image(size: int = 224):
    """A deterministic test image: a red square on a white background."""
    from PIL import Image, ImageDraw

    size = max(size, 16)
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).rectangle([size // 8, size // 8, size // 2, size // 2], fill="red")
    return image


@torch.no_grad()
def _logits(model, sample: Sample, device: str) -> torch.Tensor:
    model.eval()
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    pixel_dtype = next(llava.model.vision_tower.parameters()).dtype
    ids = sample.input_ids.to(device)
    out = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=sample.pixel_values.to(device=device, dtype=pixel_dtype),
        use_cache=False,
    )
    return out.logits.float().cpu()


# --- the output folder -------------------------------------------------------------------------------------


def _check_shard_size(max_shard_size) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        if convert_file_size_to_int(max_shard_size) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise LvitError(
            f"--max-shard-size {max_shard_size!r} is not a size; use e.g. 5GB, 500MB or a number of bytes."
        ) from None


def _check_out_dir(out: Path, run_path: Path, overwrite: bool) -> None:
    resolved, run_resolved = out.resolve(), run_path.resolve()
    if resolved == run_resolved or resolved in run_resolved.parents:
        raise LvitError(
            f"lvit export: --out {out} is the run folder {run_path} or holds it; exporting there would "
            "destroy the run. Choose a folder outside it."
        )
    if out.exists() and not out.is_dir():
        raise LvitError(f"lvit export: --out {out} exists and is a file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LvitError(
            f"lvit export: --out {out} exists and is not empty; lvit does not overwrite it. Choose another "
            "folder, remove it yourself, or pass --overwrite to replace it (only once the new export has passed "
            "its self-check)."
        )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the checked export to `out`; an existing `out` (--overwrite) is replaced only now."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _quiet_transformers():
    """No per-file progress bars while loading and saving (the export prints its own steps)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --- what the export says about itself ---------------------------------------------------------------------


def _write_export_info(folder: Path, run, result: ExportResult) -> None:
    info = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items() if k != "path"}
    info.update(source=str(run.path.resolve()), run=run.info, recipe=run.recipe.to_dict())
    (folder / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))


def _trainer_state(run) -> dict | None:
    path = run.path / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    return {"global_step": state.get("global_step"), "last_logged_loss": losses[-1] if losses else None}


_LOAD_SNIPPET = """
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

path = "{path}"
model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.{dtype}, device_map="auto")
processor = AutoProcessor.from_pretrained(path)
{prompt}
inputs = processor(images=Image.open("image.jpg"), text=prompt, return_tensors="pt")
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


def model_card(run, result: ExportResult, out: Path) -> str:
    """The README.md of an export: what it is made of, how it was trained and checked, how to load it."""
    from lvit.runs import RECIPE_FILE

    recipe, info = run.recipe, run.info
    stage = "stage 1 (align: only the projector trained)" if recipe.stage == "align" else "stage 2 (finetune)"
    method = {"align": "projector only", "full": "full fine-tune", "lora": "LoRA", "qlora": "QLoRA (4-bit NF4 base)"}
    checkpoint = run.path.name if run.path.name.startswith("checkpoint-") else None
    hub_ids = [m for m in (recipe.model.vision_tower, recipe.model.language_model) if not Path(m).exists()]
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [llava, lvit]"]
    if hub_ids and not result.projector_only:
        front.append("base_model: [" + ", ".join(hub_ids) + "]")
    front.append("---")
    what = "projector of a LLaVA model" if result.projector_only else "LLaVA model"
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
        f"| vision tower | `{recipe.model.vision_tower}` (CLIP, feature layer {recipe.model.vision_feature_layer}) |",
        f"| language model | `{recipe.model.language_model}` |",
        f"| projector | `{recipe.model.projector}`"
        + (f", initialised from `{recipe.model.projector_from}`" if recipe.model.projector_from else "")
        + " |",
        f"| stage / method | {stage} / {method[run.kind]} |",
        f"| template | `{recipe.data.template}` |",
        f"| data | `{recipe.data.path}` (images: `{recipe.data.image_folder}`) |",
        f"| source run | `{run.path.resolve()}`"
        + (f" ({checkpoint}, an intermediate checkpoint)" if checkpoint else "")
        + " |",
        f"| weights | {result.dtype}" + ("" if result.projector_only else ", safetensors") + " |",
        "",
        "## Training metrics",
        "",
    ]
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.6g} |" for k, v in metrics.items())]
    else:
        lines.append("None recorded in `lvit_run.json` (an intermediate checkpoint, or an unfinished run).")
    state = _trainer_state(run)
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
            f"  vision_tower: {recipe.model.vision_tower}",
            f"  language_model: {recipe.model.language_model}",
            f"  projector: {recipe.model.projector}",
            f"  projector_from: {out}",
            "```",
        ]
    else:
        prompt = _PLAIN_PROMPT if recipe.data.template == "plain" else _CHAT_PROMPT
        torch_dtype = str(DTYPES[result.dtype]).removeprefix("torch.")
        lines += [
            "Plain transformers (no lvit, no peft, no `trust_remote_code`):",
            "",
            "```python",
            _LOAD_SNIPPET.format(path=str(out), dtype=torch_dtype, prompt=prompt).strip(),
            "```",
        ]
    recipe_path = run.path / RECIPE_FILE
    lines += ["", "## Recipe", "", f"`{recipe_path}`:", "", "```yaml", recipe_path.read_text().rstrip(), "```", ""]
    return "\n".join(lines)


def _write_model_card(folder: Path, run, result: ExportResult, out: Path) -> None:
    (folder / README_FILE).write_text(model_card(run, result, out))
