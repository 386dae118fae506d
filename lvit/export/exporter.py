"""`lvit export RUN_DIR --out DIR`: any lvit run (or checkpoint) as a stock, self-checked LLaVA folder.

One entry point for every kind of run folder lvit writes (`lvit.runs`): stage 1 (`align`), stage 2
`full`, `lora` and `qlora`, and their `checkpoint-N` folders.

- Default: the run's trained weights as a plain `LlavaForConditionalGeneration` (`LlavaNextForConditionalGeneration`
  for a LLaVA-NeXT run) + its processor,
  in (sharded) safetensors. Adapters are merged (QLoRA into the *dequantized* 4-bit base, see
  `lvit.infer.load.load_merged`); no peft wrapper, `lora_` or `modules_to_save` key is left, and the
  folder loads with plain transformers: no lvit, no peft, no `trust_remote_code`.
- `--projector-only`: just `projector.safetensors` (+ the run's `lvit_run.json` /
  `lvit_recipe.yaml`), a folder a stage-2 recipe's `model.projector_from` consumes.

Every export is self-checked (`lvit.export.selfcheck`) and described (`lvit_export.json`, and a model card,
`lvit.export.card`). It is written into a temporary sibling folder and renamed into place only once
the check passed, so a failed or interrupted export never leaves a folder that looks complete.
Progress goes to the "lvit" logger.
"""

from __future__ import annotations

import copy
import gc
import logging
import types
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lvit.errors import LvitError
from lvit.export.card import model_card
from lvit.export.compat import write_for_older_loaders
from lvit.export.folder import check_out_dir, move_into_place, temporary_folder
from lvit.export.gguf.build import check_gguf_options, write_gguf
from lvit.export.selfcheck import (
    build_sample,
    check_chat_template_ids,
    default_tolerance,
    logits,
    max_abs_diff,
    projector_outputs,
    projector_tolerance,
)
from lvit.infer.load import load_merged, load_trained
from lvit.model.next import stock_class
from lvit.model.projector import load_projector, new_projector
from lvit.runs.files import (
    MODEL_CARD_FILE,
    RunFolder,
    copy_run_files,
    read_run,
    write_export_info,
    write_projector,
)

log = logging.getLogger(__name__)

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
    image_processor: str | None = None
    """The image processor class written with a whole-model export (and used by its self-check)."""
    gguf: dict | None = None
    """With --gguf: the GGUF files written and, with --verify-gguf, llama.cpp's agreement per file."""


@dataclass
class GgufOptions:
    """What `--gguf` writes (see `lvit.export.gguf.build`)."""

    dtype: str = "f16"
    quant: str | None = None
    verify: bool = False
    llama_cpp: str | None = None


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise LvitError(f"--dtype {name!r} is not supported; use bf16, fp16 or fp32.") from None


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
    base_model: dict[str, str] | None = None,
    gguf: GgufOptions | None = None,
) -> ExportResult:
    """Export the run or checkpoint `run_dir` to `out`; returns what was written and the self-check.
    `gguf`: also write the GGUF files llama.cpp and Ollama load (`lvit.export.gguf.build`).

    Raises `LvitError` (and leaves `out` untouched) if the run cannot be read, `out` is in the way,
    or the self-check fails.
    """
    run_dir, out = Path(run_dir), Path(out)
    try:
        run = read_run(run_dir, base_model)
    except LvitError as exc:
        raise LvitError(
            f"lvit export: {exc}\nRUN_DIR must be the output folder of an `lvit finetune` run "
            "(its training.output_dir) or one of its checkpoint-N folders."
        ) from None
    if tolerance is not None and not tolerance >= 0:
        raise LvitError(f"--tolerance must be a number >= 0, got {tolerance}.")
    target_dtype = parse_dtype(dtype) if dtype is not None else (None if projector_only else DTYPES[DEFAULT_DTYPE])
    _check_shard_size(max_shard_size)
    check_out_dir(out, run.path, overwrite)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise LvitError(f"--device {device}: no CUDA GPU is visible here; leave --device out to use the CPU.")
    if gguf is not None:
        if projector_only:
            raise LvitError("--gguf writes a whole model; it does not go with --projector-only.")
        if run.recipe.model.architecture == "llava_next":
            raise LvitError(
                f"{run.path}: a LLaVA-NeXT run (model.architecture: llava_next): --gguf is refused. llama.cpp's "
                "mtmd (llama-server, llama-mtmd-cli, Ollama) gives such a model 576 tokens per tile with the whole "
                "image last, no unpadding and no row newline, and no tiles for an image up to the tower's size: "
                "other image tokens than it was trained on (docs/stack-notes.md#llama-cpp-anyres). Export without "
                "--gguf: the folder is a stock LlavaNextForConditionalGeneration that transformers and vLLM load."
            )
        converter, quants = check_gguf_options(gguf.dtype, gguf.quant, gguf.verify, gguf.llama_cpp)

    with temporary_folder(out) as tmp:
        with _quiet_transformers():
            if projector_only:
                result = _export_projector(run, tmp, target_dtype, tolerance, device)
            else:
                result = _export_model(run, tmp, target_dtype, tolerance, max_shard_size, device)
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
        if gguf is not None:
            result.gguf = write_gguf(tmp, run, gguf.dtype, quants, converter, gguf.verify)
        _describe(tmp, run, result, out)
        move_into_place(tmp, out)
    result.path = out
    log.info("exported %s run %s -> %s (%s)", result.kind, run.path, out, result.dtype)
    return result


# --- whole model -------------------------------------------------------------------------------------------


def _export_model(run: RunFolder, tmp: Path, dtype, tolerance, max_shard_size, device: str) -> ExportResult:
    from transformers import AutoProcessor

    merge = " (adapters merged)" if run.kind in ("lora", "qlora") else ""
    log.info("[1/3] %s run %s: writing a stock LLaVA model%s (%s)", run.kind, run.path, merge, _SHORT[dtype])
    merged, processor, _ = load_merged(run, dtype)
    _assert_no_adapters(merged, f"the merged model of {run.path}")
    _clean_config(merged.config, dtype)
    config = copy.deepcopy(merged.config)
    merged.save_pretrained(tmp, max_shard_size=max_shard_size)
    processor.save_pretrained(tmp)
    write_for_older_loaders(tmp, processor.image_token)
    del merged
    gc.collect()
    _assert_no_adapter_keys(tmp)
    sample = build_sample(run, processor, config)
    n = check_chat_template_ids(run, AutoProcessor.from_pretrained(tmp), config)
    log.info("self-check: the written chat template gives the training ids on %d conversation(s)", n)

    trained_as = "4-bit base + adapter" if run.kind == "qlora" else run.kind
    log.info("[2/3] self-check: the run's model as trained (%s)", trained_as)
    # QLoRA's as trained: the 4-bit base computes in its compute dtype, the projector copy in the recipe's dtype
    trained, _, _ = load_trained(run, device=device, masters=run.kind != "qlora")
    if run.kind != "qlora":
        trained = trained.float()  # compare in fp32: a 16-bit run's weights upcast exactly
    ref = logits(trained, sample, device)
    del trained
    gc.collect()

    log.info(
        "[3/3] self-check: the export as written, reloaded with plain from_pretrained in fp32 (%s)", sample.description
    )
    exported, info = stock_class(run.recipe.model.architecture).from_pretrained(
        tmp, dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise LvitError(f"lvit export: the written model does not reload cleanly ({bad}); this is an lvit bug.")
    got = logits(exported.to(device), sample, device)
    del exported
    gc.collect()

    diff = max_abs_diff(got, ref)
    if tolerance is None:
        tolerance = default_tolerance(
            run.kind,
            dtype,
            getattr(torch, run.recipe.model.torch_dtype),
            getattr(torch, run.recipe.lora.compute_dtype) if run.kind == "qlora" else None,
            ref.abs().max().item(),
        )
    verdict = "ok" if diff <= tolerance else "FAIL"
    log.info("self-check: max |logit difference| = %.3g (tolerance %.3g) %s", diff, tolerance, verdict)
    image_processor = type(processor.image_processor).__name__
    return ExportResult(tmp, run.kind, _SHORT[dtype], False, diff, tolerance, sample.description, image_processor)


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


def _export_projector(run: RunFolder, tmp: Path, dtype, tolerance, device: str) -> ExportResult:
    log.info("[1/2] %s run %s: the trained projector", run.kind, run.path)
    if run.recipe.model.architecture == "llava_next":
        log.warning(
            "a LLaVA-NeXT run: the projector-only export holds the projector, not image_newline; a NeXT stage 2 "
            "started from it (model.projector_from) draws a new image_newline, as it does on a LLaVA-1.5 stage 1"
        )
    trained, processor, _ = load_trained(run, device=device, masters=True)
    llava = trained.get_base_model() if hasattr(trained, "get_base_model") else trained
    projector = _unwrap_projector(llava.model.multi_modal_projector)
    trained_dtype = next(projector.parameters()).dtype
    dtype = dtype or trained_dtype
    write_projector(tmp, projector.state_dict(), dtype)
    copy_run_files(run, tmp)

    log.info("[2/2] self-check: the written projector, loaded the way model.projector_from loads it")
    config = llava.config
    consumer = types.SimpleNamespace(model=types.SimpleNamespace(multi_modal_projector=None))
    consumer.model.multi_modal_projector = new_projector(config, run.recipe.model.projector, torch.float32)
    load_projector(consumer, str(tmp), run.recipe.model.projector, f"lvit export --projector-only {tmp}")
    sample = build_sample(run, processor, config)
    ref, got = projector_outputs(llava, projector, consumer.model.multi_modal_projector, sample, device)
    del trained, llava
    gc.collect()
    diff = max_abs_diff(got, ref)
    if tolerance is None:
        tolerance = projector_tolerance(dtype, trained_dtype, ref.abs().max().item())
    verdict = "ok" if diff <= tolerance else "FAIL"
    log.info("self-check: max |projector output difference| = %.3g (tolerance %.3g) %s", diff, tolerance, verdict)
    return ExportResult(tmp, run.kind, _SHORT.get(dtype, str(dtype)), True, diff, tolerance, sample.description)


def _unwrap_projector(module):
    """The projector a run computes with: for adapters, peft's active `modules_to_save` copy."""
    copies = getattr(module, "modules_to_save", None)
    if copies is None:
        return module
    active = module.active_adapter
    return copies[active if isinstance(active, str) else active[0]]


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


@contextmanager
def _quiet_transformers():
    """No per-file progress bars while loading and saving (the export reports its own steps)."""
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


def _describe(folder: Path, run: RunFolder, result: ExportResult, out: Path) -> None:
    """What the export says about itself: `lvit_export.json` and the model card."""
    write_export_info(folder, run, {k: v for k, v in asdict(result).items() if k != "path"})
    (folder / MODEL_CARD_FILE).write_text(model_card(run, result, out))
