"""The language model of an exported LLaVA folder as a GGUF file, through llama.cpp's own converter.

For the language model llama.cpp's `convert_hf_to_gguf.py` works: it knows every family lvit trains (Llama/Vicuna,
Qwen, Mistral, Gemma) with their tokenizers, including what the GGUF must say about a BPE tokenizer's
pre-tokenizer, which only that script keeps up. lvit writes the export's language model as a plain causal-LM
folder (`config.json` of the text model, its weights renamed, the tokenizer with the run's chat template) and runs
the converter on it in a subprocess. The converter ships with llama.cpp's source, not with any wheel: `--llama-cpp
DIR` (or `LVIT_LLAMA_CPP`) names a llama.cpp checkout, or the `vendor/llama.cpp` folder of the `llama-cpp-python`
source package. Quantized types are made from the f16 file with llama.cpp's quantizer (`llama_model_quantize`,
through `llama-cpp-python`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lvit.errors import LvitError
from lvit.export.gguf.spm import write_sentencepiece_model

CONVERTER = "convert_hf_to_gguf.py"
ENV_VAR = "LVIT_LLAMA_CPP"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
_LM_PREFIXES = ("model.language_model.", "language_model.model.")  # transformers 5 in memory / as saved
_HEAD_PREFIXES = ("lm_head.", "language_model.lm_head.")

GET_LLAMA_CPP = (
    "git clone --depth 1 https://github.com/ggml-org/llama.cpp, or unpack the llama-cpp-python source package "
    "(`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`, then use its vendor/llama.cpp)"
)


def find_converter(llama_cpp: str | Path | None) -> Path:
    """llama.cpp's `convert_hf_to_gguf.py` under `llama_cpp` (else `$LVIT_LLAMA_CPP`); a clear error if absent."""
    root = llama_cpp or os.environ.get(ENV_VAR)
    if not root:
        raise LvitError(
            f"lvit export --gguf needs llama.cpp's converter ({CONVERTER}) for the language model: pass --llama-cpp "
            f"DIR (or set {ENV_VAR}) with a llama.cpp source folder. To get one: {GET_LLAMA_CPP}."
        )
    script = Path(root) / CONVERTER
    if not script.is_file():
        raise LvitError(
            f"lvit export --gguf: {root} has no {CONVERTER}; --llama-cpp must be a llama.cpp source folder. "
            f"To get one: {GET_LLAMA_CPP}."
        )
    return script


def write_language_model(export: Path, folder: Path, chat_template: str | None) -> bool | None:
    """The export's language model as a causal-LM folder at `folder`: what llama.cpp's converter reads. Returns what
    the GGUF's `tokenizer.ggml.add_space_prefix` must be set to afterwards (`set_space_prefix`), None to leave it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((export / "config.json").read_text())
    text = dict(config["text_config"])
    arch = _causal_lm_class(text["model_type"])
    text["architectures"] = [arch]
    text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(text, indent=2))
    tensors = {}
    for path in sorted(export.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = _lm_name(key)
                if name is not None:
                    tensors[name] = f.get_tensor(key)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in _TOKENIZER_FILES:
        if (export / name).is_file():
            shutil.copy(export / name, folder / name)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    tok_config.pop("processor_class", None)
    if "added_tokens_decoder" not in tok_config:  # the converter reads added tokens (<image>, <pad>) from here
        added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
        tok_config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return write_sentencepiece_model(folder)  # a Llama-style tokenizer's merge order, read by llama.cpp as scores


def _causal_lm_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise LvitError(f"lvit export --gguf: no causal-LM class is known for the language model type {model_type!r}.")
    return name


def _lm_name(key: str) -> str | None:
    for prefix in _LM_PREFIXES:
        if key.startswith(prefix):
            return "model." + key[len(prefix) :]
    for prefix in _HEAD_PREFIXES:
        if key.startswith(prefix):
            return "lm_head." + key[len(prefix) :]
    return None


def convert(lm_folder: Path, out: Path, outtype: str, converter: Path) -> None:
    """Run llama.cpp's converter on `lm_folder`, writing `out` (`outtype`: f16, f32, bf16 or q8_0)."""
    cmd = [sys.executable, str(converter), str(lm_folder), "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise LvitError(
            f"lvit export --gguf: llama.cpp's converter ({converter}) failed on the language model:\n{tail}\n"
            "Its requirements are in the llama.cpp folder's requirements/requirements-convert_hf_to_gguf.txt."
        )


def set_space_prefix(path: Path, value: bool) -> None:
    """Rewrite the GGUF at `path` with `tokenizer.ggml.add_space_prefix` = `value` (the `gguf` package's metadata
    copier: the tensors are copied unchanged)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(path, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    new = {gguf.Keys.Tokenizer.ADD_PREFIX: MetadataDetails(gguf.GGUFValueType.BOOL, value)}
    with contextlib.redirect_stderr(io.StringIO()):  # its byte progress bar; the export logs its own steps
        copy_with_new_metadata(reader, writer, new, [])
    del reader
    tmp.replace(path)


# The quantized types `--quant` takes: llama.h's LLAMA_FTYPE_MOSTLY_<name>.
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")


def parse_quants(text: str | None) -> list[str]:
    if not text:
        return []
    names = [q.strip().upper() for q in text.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUANT_TYPES]
    if unknown:
        raise LvitError(f"--quant {','.join(unknown)}: unknown type; use some of {', '.join(QUANT_TYPES)}.")
    return names


def quantize(src: Path, dst: Path, qtype: str) -> None:
    """`dst`: `src` (an f16/f32 GGUF) quantized to `qtype` by llama.cpp's quantizer."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = max(1, os.cpu_count() or 1)
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0 or not dst.is_file():
        raise LvitError(f"lvit export --gguf: llama.cpp could not quantize {src.name} to {qtype}.")
