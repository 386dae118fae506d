"""`lvit export RUN --out DIR --gguf`: beside the Hugging Face folder, the GGUF pair llama.cpp and Ollama load.

- `model-<dtype>.gguf`: the language model (`lvit.export.gguf.language`, llama.cpp's converter), f16 or f32;
- `mmproj-<dtype>.gguf`: the vision tower and projector (`lvit.export.gguf.mmproj`, the `gguf` package's writer);
- `model-<QUANT>.gguf` for each `--quant` type (llama.cpp's quantizer; the mmproj stays as it is, as the LLaVA GGUF
  files on the Hub do);
- `Modelfile` for `ollama create` (`lvit.export.gguf.modelfile`).

With `--verify-gguf` llama.cpp loads each pair and answers the check prompts (`lvit.export.gguf.verify`): the
f16/f32 file must give transformers' prompt ids, image rows and greedy tokens, or the export fails and nothing is
written; quantized files are measured. The GGUF files are written from the export's own folder (its weights as
written, in the export's dtype), so they hold what the Hugging Face folder holds.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from lvit.errors import LvitError
from lvit.export.gguf.language import (
    convert,
    find_converter,
    parse_quants,
    quantize,
    set_space_prefix,
    write_language_model,
)
from lvit.export.gguf.mmproj import linear_shift, vision_settings, write_mmproj
from lvit.export.gguf.modelfile import write_modelfile
from lvit.export.gguf.runtime import bindings
from lvit.export.gguf.verify import check_prompts, compare, image_rows, load_export, references

log = logging.getLogger(__name__)

GGUF_DTYPES = ("f16", "f32")
_CLIP_NOTE = (
    "llama.cpp's LLaVA graph (tools/mtmd/models/llava.cpp) puts a CLIP tower's class token after the patches and "
    "passes rows 1..n on, so with a CLIP tower it computes other image rows than CLIP does (LLaVA-1.5's GGUF files "
    "on the Hub included): see docs/stack-notes.md#llama-cpp-clip-class-token. The files are right for llama.cpp "
    "once its graph keeps CLIP's order; until then, export a CLIP-tower model without --verify-gguf and know that "
    "llama.cpp's answers will differ from transformers', or train with a SigLIP tower"
)


def check_gguf_options(dtype: str, quant: str | None, verify: bool, llama_cpp) -> tuple[Path, list[str]]:
    """Before any work: the converter is there, the dtype and quant types are known, llama.cpp's bindings import
    when they are needed. Returns (converter, quant types)."""
    if dtype not in GGUF_DTYPES:
        raise LvitError(f"--gguf-dtype {dtype!r}: use f16 or f32.")
    converter = find_converter(llama_cpp)
    quants = parse_quants(quant)
    if quants or verify:
        bindings()
    return converter, quants


def write_gguf(folder: Path, run, dtype: str, quants: list[str], converter: Path, verify: bool) -> dict:
    """Write the GGUF files into the export `folder` (already written and self-checked); returns what was written
    and checked, for `lvit_export.json`. transformers' side of the check (and a `linear` projector's shift) is
    computed first, from one load of the export, which is released before llama.cpp loads anything."""
    from transformers import AutoProcessor, GenerationConfig

    settings = vision_settings(folder)  # refuses an unsupported tower or projector first
    processor = AutoProcessor.from_pretrained(folder)
    prompts = refs = side = None
    shift = 0.0
    if verify or settings["projector"] == "linear":
        model, _ = load_export(folder)
        prompts = check_prompts(run, processor, model.config.vision_config.image_size)
        if settings["projector"] == "linear":
            shift = linear_shift(_pre_activations(model, processor, prompts))
        if verify:
            refs, side = references(model, processor, prompts)
        del model
    model_file, mmproj_file = f"model-{dtype}.gguf", f"mmproj-{dtype}.gguf"
    log.info("gguf: %s (vision tower + %s projector, gguf writer)", mmproj_file, settings["projector"])
    image_processor = processor.image_processor.to_dict()
    info = {"mmproj": write_mmproj(folder, settings, image_processor, folder / mmproj_file, dtype, shift)}
    work = folder / ".gguf-language-model"
    try:
        log.info("gguf: %s (language model, llama.cpp's converter %s)", model_file, converter)
        space_prefix = write_language_model(folder, work, processor.chat_template)
        convert(work, folder / model_file, dtype, converter)
        if space_prefix is not None:
            set_space_prefix(folder / model_file, space_prefix)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = [model_file, mmproj_file]
    for q in quants:
        log.info("gguf: model-%s.gguf (llama.cpp's quantizer)", q)
        quantize(folder / model_file, folder / f"model-{q}.gguf", q)
        files.append(f"model-{q}.gguf")
    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    stop = [processor.tokenizer.convert_ids_to_tokens(i) for i in (eos if isinstance(eos, list) else [eos])]
    write_modelfile(folder, model_file, mmproj_file, processor, stop, max(2048, run.recipe.data.max_length))
    files.append("Modelfile")
    info.update(files=files, dtype=dtype, converter=str(converter))
    if verify:
        models = [f for f in files if f.startswith("model-")]
        info["checks"] = _verify(folder, models, mmproj_file, prompts, refs, side, settings["tower"])
    return info


def _verify(folder, models: list[str], mmproj_file: str, prompts, refs, side, tower: str) -> list[dict]:
    """Each language-model file with the mmproj in llama.cpp against transformers; the first (f16/f32) must agree.
    The image rows come from the mmproj alone: compared with the first file, the same for the others."""
    rows = []
    for name in models:
        exact = name == models[0]
        got = compare(folder / name, folder / mmproj_file, prompts, refs, side, exact, images=exact)
        if not exact:
            got.image_difference = rows[0]["image_difference"]
        log.info(
            "gguf check %s: prompt ids equal %d/%d, answers equal %d/%d, top-1 agreement %.3f, image rows within "
            "%.2g%% %s",
            name,
            got.prompt_ids_equal,
            got.prompts,
            got.answers_equal,
            got.prompts,
            got.top1_agreement,
            100 * got.image_difference,
            "ok" if got.ok else ("FAIL" if exact else "(measured)"),
        )
        rows.append(got.row())
        if not got.ok:
            where = [p.where for p, d in zip(prompts, got.first_difference, strict=True) if d is not None]
            raise LvitError(
                f"lvit export --verify-gguf: llama.cpp does not answer as transformers does with {name}: prompt ids "
                f"equal on {got.prompt_ids_equal}/{got.prompts} prompts, greedy answers on {got.answers_equal}/"
                f"{got.prompts} (first differing: {', '.join(where[:3]) or 'none'}; transformers' smallest gap "
                f"between its two likeliest tokens: {min(r.margin for r in refs):.3g}), image rows differ by up to "
                f"{100 * got.image_difference:.3g}% of their size; nothing was written."
                + (f"\n{_CLIP_NOTE}." if tower == "clip" else "")
            )
    return rows


def _pre_activations(model, processor, prompts) -> np.ndarray:
    """The linear projector's `linear_1` outputs on the check images (what `linear_shift` is chosen from)."""
    import torch

    seen = []
    hook = model.model.multi_modal_projector.linear_1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        with torch.no_grad():
            for prompt in prompts:
                image_rows(model, processor.image_processor(prompt.images, return_tensors="pt")["pixel_values"])
    finally:
        hook.remove()
    return torch.cat([s.flatten() for s in seen]).numpy() if seen else np.zeros(0)
