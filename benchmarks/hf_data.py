"""How long a Hugging Face dataset with embedded images takes to check, prepare and batch.

Writes, under --out (default /tmp/lvit-hf-data-bench), a `save_to_disk` dataset of --records rows in
LLaVA's schema (`id`, `image`: a `datasets.Image` holding PNG bytes, `conversations`), the kind of
dataset the Hub serves, and a tiny model folder for the tokenizer and image processor. Then it
times, once each:

- `check`, `check --decode`: `lvit data check DATA --json [--decode]` as a user runs it (a fresh
  process; `--decode` reads and decodes every image);
- `prepare`: `lvit.data.dataset.prepare`, which training runs before the first step (read, check,
  measure in tokens, build the training dataset);
- `batches`: the collator over the first --batch-rows rows of the training dataset, 16 a batch, in a
  `DataLoader` without workers (reading each image's bytes, decoding, the image processor,
  tokenizing);
- `pickle`: the size of the training dataset and the collator pickled (what each data-loader
  worker receives).

    python benchmarks/hf_data.py                       # 50K records
    python benchmarks/hf_data.py --records 5000        # quicker
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import resource
import subprocess
import sys
import time
from pathlib import Path


def write_dataset(out: Path, n_records: int, n_images: int, seed: int = 0) -> Path:
    import datasets
    from PIL import Image

    rng = random.Random(seed)
    pngs = []
    for _ in range(n_images):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3))).save(buf, "PNG")
        pngs.append(buf.getvalue())
    words = ["red", "blue", "green", "square", "circle", "left", "right", "top", "bottom", "small", "large"]

    def rows():
        for i in range(n_records):
            caption = " ".join(rng.choices(words, k=rng.randint(4, 16)))
            text_only = i % 50 == 0
            yield {
                "id": f"r{i}",
                "image": None if text_only else {"bytes": pngs[i % n_images], "path": None},
                "conversations": [
                    {"from": "human", "value": "Describe the image." if text_only else "<image>\nDescribe the image."},
                    {"from": "gpt", "value": caption},
                ],
            }

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        }
    )
    data = out / "data"
    datasets.Dataset.from_generator(rows, features=features, cache_dir=str(out / "cache")).save_to_disk(data)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/lvit-hf-data-bench"))
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-rows", type=int, default=4096)
    parser.add_argument("--skip-write", action="store_true", help="Reuse the data already under --out.")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = out / "data"
    if not args.skip_write:
        start = time.perf_counter()
        write_dataset(out, args.records, args.images)
        from lvit.demo.tiny import build_tiny_parts

        build_tiny_parts(out / "parts")
        print(f"wrote {args.records} records in {time.perf_counter() - start:.0f} s")
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} before the runs")

    for flags in ([], ["--decode"]):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "lvit", "data", "check", str(data), "--json", *flags]
        rc = subprocess.run(cmd, capture_output=True, text=True).returncode
        took = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        name = " ".join(["check", *flags])
        print(f"{name}: {took:.1f} s wall, {cpu:.1f} s CPU (exit {rc}): lvit {' '.join(cmd[3:])}")

    import torch
    from torch.utils.data import DataLoader, Subset
    from transformers import AutoImageProcessor, CLIPVisionConfig

    from lvit.data.collator import LlavaCollator
    from lvit.data.dataset import prepare
    from lvit.data.images import ImageLoader
    from lvit.model.processor import load_tokenizer
    from lvit.model.towers import num_image_tokens
    from lvit.recipe.schema import DataSection
    from lvit.templates.conversation import IMAGE_PLACEHOLDER
    from lvit.templates.encoder import ConversationEncoder

    vision, lm = out / "parts" / "tiny-clip", out / "parts" / "tiny-vicuna"
    tok = load_tokenizer(lm)
    n_img = num_image_tokens(CLIPVisionConfig.from_pretrained(vision))
    encoder = ConversationEncoder("vicuna_v1", tok, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), n_img)

    start, cpu = time.perf_counter(), time.process_time()
    prepared = prepare(DataSection(path=str(data)), encoder)
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"prepare: {took:.1f} s wall, {cpu:.1f} s CPU ({len(prepared.dataset)} training rows)")

    collator = LlavaCollator(encoder, ImageLoader(AutoImageProcessor.from_pretrained(vision)), tok.pad_token_id, 256)
    rows = Subset(prepared.dataset, range(min(args.batch_rows, len(prepared.dataset))))
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    n = sum(b["input_ids"].shape[0] for b in DataLoader(rows, batch_size=16, collate_fn=collator))
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"batches: {took:.1f} s wall, {cpu:.1f} s CPU for {n} rows ({1e3 * took / n:.2f} ms a row)")

    sizes = {name: len(pickle.dumps(obj)) for name, obj in (("dataset", prepared.dataset), ("collator", collator))}
    print("pickle: " + ", ".join(f"{name} {size / 2**20:.2f} MiB" for name, size in sizes.items()))


if __name__ == "__main__":
    main()
