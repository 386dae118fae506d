"""`lvit export`: a run as a stock LLaVA folder (or its projector), checked against the run."""

from __future__ import annotations

from pathlib import Path

import typer

from lvit.cli.common import BASE_HELP, quiet_model_libraries


def export(
    run_dir: Path = typer.Argument(..., help="An lvit run folder (training.output_dir) or one of its checkpoint-N."),
    out: Path = typer.Option(..., "--out", help="Folder to write the export to (created; must not hold files)."),
    dtype: str = typer.Option(
        None, "--dtype", help="bf16 (default), fp16 or fp32. --projector-only keeps the trained dtype by default."
    ),
    projector_only: bool = typer.Option(
        False, "--projector-only", help="Write only the projector, for a stage-2 recipe's model.projector_from."
    ),
    tolerance: float = typer.Option(
        None, "--tolerance", help="Largest logit difference the self-check accepts (default: per kind and dtype)."
    ),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors file, e.g. 5GB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is not empty (after the check)."),
    device: str = typer.Option(None, "--device", help="Where the self-check runs (default: cuda if available)."),
    base_model: list[str] = typer.Option(None, "--base-model", help=BASE_HELP),
    gguf: bool = typer.Option(
        False, "--gguf", help="Also write the GGUF pair llama.cpp / Ollama load (model + mmproj) and a Modelfile."
    ),
    gguf_dtype: str = typer.Option("f16", "--gguf-dtype", help="f16 (default) or f32 for the GGUF files."),
    quant: str = typer.Option(None, "--quant", help="Quantized language-model GGUFs too, e.g. Q8_0,Q4_K_M."),
    verify_gguf: bool = typer.Option(
        False, "--verify-gguf", help="Run the GGUF files in llama.cpp; fail unless they answer as transformers does."
    ),
    llama_cpp: Path = typer.Option(
        None, "--llama-cpp", help="A llama.cpp source folder, for its convert_hf_to_gguf.py (or set LVIT_LLAMA_CPP)."
    ),
) -> None:
    """Export a run (any stage / method, or a checkpoint) as a stock, self-checked LLaVA folder."""
    quiet_model_libraries()
    from lvit.errors import LvitError
    from lvit.export.exporter import GgufOptions
    from lvit.export.exporter import export as do_export
    from lvit.runs.files import parse_base_model

    if not gguf and (quant or verify_gguf or llama_cpp or gguf_dtype != "f16"):
        raise LvitError("--quant, --verify-gguf, --gguf-dtype and --llama-cpp go with --gguf; add --gguf.")
    options = GgufOptions(gguf_dtype, quant, verify_gguf, str(llama_cpp) if llama_cpp else None) if gguf else None

    do_export(
        run_dir,
        out,
        dtype=dtype,
        projector_only=projector_only,
        tolerance=tolerance,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        device=device,
        base_model=parse_base_model(base_model),
        gguf=options,
    )
