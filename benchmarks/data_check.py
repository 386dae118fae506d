"""How long `lvit data check` takes on a 600K-record LLaVA JSON (the size of LLaVA-CC3M-Pretrain-595K).

Writes, under --out (default /tmp/lvit-data-check-bench):

- `images/`: a few thousand small PNG files, referenced over and over (so the run measures lvit,
  not the disk);
- `data.json`: one LLaVA JSON list of 600K records (see `write_data` for the mix: mostly
  CC3M-style captions, some short-answer VQA and long LLaVA-Instruct-style conversations, a few
  text-only), from a pseudo-English vocabulary, with a handful of broken records (a missing image,
  a conversation that does not alternate, a duplicate id);
- `parts/`: a tiny CLIP config at 224 px / patch 14 (256 image tokens, like ViT-L/14) and a
  language model folder whose BPE tokenizer is trained on that vocabulary, plus `recipe.yaml`
  (max_length 2048) for the `--recipe` run. Only configs and the tokenizer are read.

Then it runs, as a user would, `lvit data check DATA --image-folder IMAGES` and
`lvit data check DATA --image-folder IMAGES --recipe recipe.yaml` (each with `--json` to a file)
and prints the wall time of each.

    python benchmarks/data_check.py                    # 600K records
    python benchmarks/data_check.py --records 50000    # quicker
    python benchmarks/data_check.py --records 20000 --images 2000 --image-size 640 --image-format jpg --decode
                                      # photo-sized JPEGs: the header check against a full decode
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from common import syllable_words, zipf_cum_weights

INSTRUCTIONS = [  # LLaVA's brief-description instructions (CC3M-595K), a few of them
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
]


def vocabulary(rng: random.Random, n: int = 6000) -> list[str]:
    return sorted(syllable_words(rng, n * 2, (1, 2, 2, 3, 3, 4)))[:n]


def sentence(rng: random.Random, words: list[str], cum: list[float], lo: int, hi: int) -> str:
    text = " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(lo, hi)))
    return text[0].upper() + text[1:] + rng.choice((".", ".", "?", "!"))


VQA_SUFFIX = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt


def write_data(
    out: Path, n_records: int, n_images: int, seed: int = 0, size: int = 24, fmt: str = "png"
) -> tuple[Path, Path, list[str]]:
    """Records shaped mostly like LLaVA-CC3M-Pretrain-595K (the paper's 600K stage-1 set) with some
    stage-2 data mixed in: 85% captions (an instruction and a 8-20 word caption), 12% short-answer
    VQA conversations (1-3 questions, as VQAv2/GQA in llava_v1_5_mix665k), 3% long conversations
    (LLaVA-Instruct style: 40-120 word answers; a third of them text-only)."""
    from PIL import Image

    rng = random.Random(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    noise = None
    for i in range(n_images):
        name = images / f"{i:05d}.{fmt}"
        if not name.exists():
            if size <= 64:
                Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3))).save(name)
            else:  # photo-sized: noise, so the encoder (JPEG's as a camera's) cannot make the decode trivial
                noise = noise or Image.effect_noise((size, size * 3 // 4), 64).convert("RGB")
                noise.rotate(rng.randrange(360)).save(name, quality=90) if fmt == "jpg" else noise.save(name)
    words = vocabulary(rng)
    cum = zipf_cum_weights(len(words))
    records = []
    for i in range(n_records):
        kind = rng.random()
        image = f"{rng.randrange(n_images):05d}.{fmt}"
        if kind < 0.85:
            instruction = rng.choice(INSTRUCTIONS)
            q = f"{instruction}\n<image>" if rng.random() < 0.5 else f"<image>\n{instruction}"
            conv = [{"from": "human", "value": q}, {"from": "gpt", "value": sentence(rng, words, cum, 8, 20)}]
            records.append({"id": f"cap-{i}", "image": image, "conversations": conv})
            continue
        conv = []
        long = kind >= 0.97
        for t in range(rng.randint(1, 3)):
            if long:
                q = sentence(rng, words, cum, 8, 20)
                a = " ".join(sentence(rng, words, cum, 8, 20) for _ in range(rng.randint(3, 6)))
            else:
                q = f"{sentence(rng, words, cum, 4, 10)}\n{VQA_SUFFIX}"
                a = " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(1, 3)))
            conv += [{"from": "human", "value": f"<image>\n{q}" if t == 0 else q}, {"from": "gpt", "value": a}]
        record = {"id": f"ins-{i}", "image": image, "conversations": conv}
        if long and kind >= 0.99:  # text-only
            del record["image"]
            conv[0]["value"] = conv[0]["value"].replace("<image>\n", "")
            record["id"] = f"txt-{i}"
        records.append(record)
    # a few broken records, so the report has something to say
    records[10]["image"] = f"missing/00000.{fmt}"
    records[20]["conversations"].insert(1, {"from": "human", "value": "And?"})
    records[30]["id"] = records[31]["id"]
    data = out / "data.json"
    data.write_text(json.dumps(records))
    return data, images, words


def write_parts(out: Path, words: list[str]) -> Path:
    from lvit.demo.tiny import build_tiny_parts, build_tokenizer
    from lvit.templates.builtin import VICUNA_V1_SYSTEM

    corpus = [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)] * 3
    vision_dir, lm_dir = build_tiny_parts(out / "parts", vision={"image_size": 224, "patch_size": 14})
    build_tokenizer(
        lm_dir, corpus + INSTRUCTIONS + [VICUNA_V1_SYSTEM, VQA_SUFFIX], vocab_size=32000
    )  # replaces the tiny one; no weights are read
    recipe = out / "recipe.yaml"
    recipe.write_text(
        "stage: finetune\n"
        f"model:\n  vision_tower: {vision_dir}\n  language_model: {lm_dir}\n"
        f"data:\n  path: {out / 'data.json'}\n  image_folder: {out / 'images'}\n  max_length: 2048\n"
        f"training:\n  output_dir: {out / 'run'}\n  use_cpu: true\n  bf16: false\n"
    )
    return recipe


def timed(cmd: list[str], report: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system, all threads of the child) and exit status of `cmd`."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with report.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, rc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/lvit-data-check-bench"))
    parser.add_argument("--records", type=int, default=600_000)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=24, help="Image width in pixels (height 3/4 above 64).")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--decode", action="store_true", help="Also time `lvit data check --decode`.")
    parser.add_argument("--skip-write", action="store_true", help="Reuse the data already under --out.")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_write:
        start = time.perf_counter()
        data, images, words = write_data(out, args.records, args.images, size=args.image_size, fmt=args.image_format)
        write_parts(out, words)
        mib = data.stat().st_size / 2**20
        took = time.perf_counter() - start
        print(f"wrote {args.records} records ({mib:.0f} MiB) and {args.images} images in {took:.0f} s")
    data, images, recipe = out / "data.json", out / "images", out / "recipe.yaml"
    base = [sys.executable, "-m", "lvit", "data", "check", str(data), "--image-folder", str(images), "--json"]
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} before the runs")
    runs = [("check", base), ("check --recipe", [*base, "--recipe", str(recipe)])]
    if args.decode:
        runs.append(("check --decode", [*base, "--decode"]))
    for name, cmd in runs:
        report = out / f"report-{name.replace(' ', '').replace('--', '-')}.json"
        seconds, cpu, rc = timed(cmd, report)
        s = json.loads(report.read_text())
        print(
            f"lvit data {name}: {seconds:.1f} s wall, {cpu:.1f} s CPU (exit {rc}, load average now "
            f"{os.getloadavg()[0]:.1f}): {s['records']} records, {s['images']} with an "
            f"image ({s['unique_images']} distinct), {s['text_only']} text-only, {s['errors']} errors, "
            f"{s['warnings']} warnings"
        )
        if s["lengths"]:
            ln = s["lengths"]
            print(f"  lengths (tokens, 256 image tokens included): min {ln['min']} p50 {ln['p50']} p90 {ln['p90']} "
                  f"p99 {ln['p99']} max {ln['max']}")  # fmt: skip
        print(f"  command: lvit {' '.join(cmd[3:])}")


if __name__ == "__main__":
    main()
