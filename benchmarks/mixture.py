"""Mixtures and streaming: the realised shares against the requested ones, the cost of the loss per source, and
streamed training against the in-memory path on the same data.

1. shares: the first 10,000 samples a run draws, per source, against the requested weights: the in-memory
   mixture (`lvit.data.mixture_sampler.MixtureSampler`, a 5K-record source of your own at 0.25 beside a 665K one at
   0.75, and a three-source case) and the streamed one (`lvit.data.stream.dataset.StreamedData`'s interleaving).
2. loss per source: the compact head's loss with and without the per-source sums (`compact_loss(...,
   label_sources)`: per-token cross-entropy and two `index_add`s instead of one summed cross-entropy), on 4,096
   labelled tokens of a 32,000-token vocabulary, fp32 on the CPU; median of 20 after 3 warm-ups.
3. throughput: the same stage-2 run (a small Llama, hidden 256, 4 layers; the tiny CLIP; 2,000 records of
   `data_check.py`'s generator), in memory (`data.path`, the records checked up front) and streamed (the same
   records as JSON Lines shards, `data.streaming: true`, shuffle buffer 1000), `--rounds` times alternately,
   one data-loader worker each; the Trainer's `train_samples_per_second` (the training loop, data reading
   included). Image decoding and the collator are the same code in both.

    python benchmarks/mixture.py                 # all three
    python benchmarks/mixture.py shares loss     # the quick ones
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def shares() -> None:
    from lvit.data.mixture import Source, plan
    from lvit.data.mixture_sampler import MixtureSampler

    def source(name, **amount):
        return Source(name, f"{name}.json", "auto", None, "vicuna_v1", "error", 2048, "truncate", **amount)

    cases = [
        (
            "ours 5K at 0.25 + 665K at 0.75",
            [5_000, 665_000],
            [source("ours", weight=0.25), source("llava", weight=0.75)],
        ),
        (
            "three sources at 0.5 / 0.3 / 0.2, 200K an epoch",
            [40_000, 100_000, 10_000],
            [source("a", weight=0.5), source("b", weight=0.3), source("c", weight=0.2)],
        ),
    ]
    for title, sizes, sources in cases:
        rows, start = [], 0
        for n in sizes:
            rows.append(list(range(start, start + n)))
            start += n
        samples = 200_000 if len(sizes) == 3 else None
        mixture = plan(sources, rows, [list(range(n)) for n in sizes], sizes, samples)
        source_of = {r: k for k, rs in enumerate(mixture.rows) for r in rs}
        wanted = [s.weight / sum(x.weight for x in sources) for s in sources]
        for epoch in (0, 1):
            sampler = MixtureSampler(mixture, seed=42)
            sampler.set_epoch(epoch)
            got = Counter(source_of[r] for r in list(sampler)[:10_000])
            realised = [got[k] / 10_000 for k in range(len(sources))]
            worst = max(abs(a - b) for a, b in zip(realised, wanted, strict=True))
            print(
                f"in memory, {title}, epoch {epoch} ({mixture.samples_per_epoch:,} an epoch): first 10,000 samples "
                + ", ".join(
                    f"{s.name} {r:.4f} (asked {w:.4f})" for s, r, w in zip(sources, realised, wanted, strict=True)
                )
                + f"; largest deviation {worst:.4f}"
            )
    from itertools import islice

    from lvit.data.stream.dataset import mix_sources

    for shares in ([0.25, 0.75], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]):
        draws = Counter(islice(mix_sources(shares, 42, 0, [0] * len(shares)), 10_000))
        realised = [draws[k] / 10_000 for k in range(len(shares))]
        worst = max(abs(a - b) for a, b in zip(realised, shares, strict=True))
        print(
            f"streamed, {' / '.join(f'{w:.3f}' for w in shares)}: first 10,000 draws "
            f"{' / '.join(f'{r:.4f}' for r in realised)}; largest deviation {worst:.4f}"
        )


def loss_cost() -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    n, vocab, sources = 4096, 32_000, 2
    logits = torch.randn(n, vocab)
    targets = torch.randint(vocab, (n,))
    where = torch.randint(sources, (n,))

    def plain():
        return F.cross_entropy(logits, targets, reduction="sum")

    def by_source():
        per_token = F.cross_entropy(logits, targets, reduction="none")
        zeros = torch.zeros(sources, dtype=torch.float64)
        zeros.index_add(0, where, per_token.double())
        zeros.index_add(0, where, torch.ones_like(where, dtype=torch.float64))
        return per_token.sum()

    times = {}
    for name, fn in (("summed", plain), ("per source", by_source)):
        for _ in range(3):
            fn()
        runs = []
        for _ in range(20):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
    print(
        f"loss of {n:,} labelled tokens x {vocab:,} vocabulary ({torch.get_num_threads()} threads): summed "
        f"{times['summed'] * 1e3:.2f} ms, per source {times['per source'] * 1e3:.2f} ms "
        f"(x{times['per source'] / times['summed']:.3f})"
    )


def throughput(rounds: int, out: Path) -> None:
    from data_check import write_data

    from lvit.demo.tiny import build_tiny_parts
    from lvit.recipe.load import recipe_from_dict
    from lvit.train.run import run

    out.mkdir(parents=True, exist_ok=True)
    data_file = out / "data.json"
    if not data_file.exists():
        write_data(out, 2_000, 200)
    records = json.loads(data_file.read_text())
    shards = out / "shards"
    if not shards.exists():
        shards.mkdir()
        for s in range(0, len(records), 250):
            lines = "".join(json.dumps(r) + "\n" for r in records[s : s + 250])
            (shards / f"part-{s // 250:03d}.jsonl").write_text(lines)
    parts = out / "parts"
    if not parts.exists():
        build_tiny_parts(parts, corpus=[r["conversations"][1]["value"] for r in records[:2000]],
                         text={"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4})  # fmt: skip
    results: dict[str, list[float]] = {"in memory": [], "streamed": []}
    for r in range(rounds):
        for name in ("in memory", "streamed") if r % 2 == 0 else ("streamed", "in memory"):
            streamed = name == "streamed"
            raw = {
                "stage": "finetune",
                "model": {"vision_tower": str(parts / "tiny-clip"), "language_model": str(parts / "tiny-vicuna")},
                "data": {
                    "path": str(shards if streamed else out / "data.json"),
                    "image_folder": str(out / "images"),
                    "on_bad_record": "skip",
                    "max_length": 512,
                    "streaming": streamed,
                },
                "training": {
                    "output_dir": str(out / f"run-{r}-{'s' if streamed else 'm'}"),
                    "per_device_train_batch_size": 8,
                    "max_steps": 120,
                    "learning_rate": 1e-4,
                    "use_cpu": True,
                    "bf16": False,
                    "dataloader_num_workers": 1,
                    "save_strategy": "no",
                    "report_to": "none",
                    "disable_tqdm": True,
                    "logging_steps": 50,
                },
            }
            folder = run(recipe_from_dict(raw, "<benchmark>"))
            metrics = json.loads((folder / "lvit_run.json").read_text())["metrics"]
            results[name].append(metrics["train_samples_per_second"])
            print(f"round {r}, {name}: {metrics['train_samples_per_second']:.2f} samples/s", flush=True)
    a, b = statistics.median(results["in memory"]), statistics.median(results["streamed"])
    print(f"median over {rounds} rounds: in memory {a:.2f} samples/s, streamed {b:.2f} samples/s (x{b / a:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", default=["shares", "loss", "throughput"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/lvit-mixture-bench"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    if "shares" in args.what:
        shares()
    if "loss" in args.what:
        loss_cost()
    if "throughput" in args.what:
        throughput(args.rounds, args.out)


if __name__ == "__main__":
    main()
