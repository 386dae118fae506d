"""How far llama.cpp's GGUF files of an export agree with transformers, per type: f16 and the quantized ones.

    .venv/bin/python benchmarks/gguf_agreement.py [--run RUN_DIR] [--quant Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0]

Without `--run` it trains a small LLaVA first (SigLIP-shaped tower, a Llama of hidden size 256 and 4 layers: wide
enough for llama.cpp's K-quants, whose blocks are 256 wide; the synthetic shapes task). It exports the run with
`--gguf --verify-gguf` and prints, per file, what the export's check measured on the 8 check prompts (answers to the
end of turn) and the same over 16 tokens each, past the end of turn: prompt ids equal, answers equal, the first
differing position per prompt, top-1 agreement (transformers' answer fed to both) and the image rows' difference.
Needs llama-cpp-python and llama.cpp's converter (`bash scripts/get_llama_cpp.sh`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _train(root: Path, steps: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TinyRecipes

    from lvit.demo import synthetic
    from lvit.demo.synthetic import write_shapes_data
    from lvit.demo.tiny import build_tiny_parts, build_tiny_siglip
    from lvit.train.run import run

    class Folders:  # what TinyRecipes asks of pytest's tmp_path_factory
        def mktemp(self, name):
            return Path(tempfile.mkdtemp(prefix=name, dir=root))

    data = write_shapes_data(root / "shapes", n_train=200, n_test=8)
    text = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 4}  # fmt: skip
    _, lm = build_tiny_parts(root / "parts", corpus=synthetic.corpus(), text=text)
    tower = build_tiny_siglip(root / "siglip")
    recipe = TinyRecipes((tower, lm), data, Folders())(
        "finetune", out_dir=root / "run", model={"projector": "mlp2x_gelu"}, training={"max_steps": steps}
    )
    return run(recipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--quant", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--llama-cpp", default=str(Path(sys.prefix) / "llama.cpp"))
    args = parser.parse_args()

    from lvit.export.exporter import GgufOptions, export
    from lvit.export.gguf.verify import check_prompts, compare, load_export, references
    from lvit.runs.files import read_run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dir = args.run or _train(root, args.steps)
        out = root / "export"
        result = export(run_dir, out, gguf=GgufOptions("f16", args.quant, True, args.llama_cpp))
        model, processor = load_export(out)
        prompts = check_prompts(read_run(run_dir), processor, model.config.vision_config.image_size)
        refs, side = references(model, processor, prompts, ignore_eos=True)
        print("| file | to the end of turn: answers equal | top-1 | 16 tokens: answers equal | first differences "
              "| top-1 | image rows |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for check in result.gguf["checks"]:
            longer = compare(out / check["model"], out / "mmproj-f16.gguf", prompts, refs, side, exact=False)
            diffs = ",".join("-" if d is None else str(d) for d in longer.first_difference)
            print(
                f"| {check['model']} | {check['answers_equal']}/{check['prompts']} | {check['top1_agreement']:.3f} "
                f"| {longer.answers_equal}/{longer.prompts} | {diffs} | {longer.top1_agreement:.3f} "
                f"| {100 * check['image_difference']:.2g}% |"
            )
        sizes = {p.name: p.stat().st_size for p in out.glob("model-*.gguf")}
        print("sizes (MB): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(sizes.items())))


if __name__ == "__main__":
    main()
