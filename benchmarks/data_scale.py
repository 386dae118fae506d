"""Data beyond memory: the in-memory path's up-front checks against `data.streaming`, at 1M and 5M records.

Writes, under --out (default /tmp/lvit-data-scale-bench), from `benchmarks/data_check.py`'s generator (LLaVA-CC3M-like
captions, VQA and long conversations over a few thousand small PNGs that the records share):

- `data-<N>.jsonl`: N records, one file (what the in-memory path reads);
- `shards-<N>/part-XXXXX.jsonl`: the same lines in shards of 100,000 (what the streamed path reads);
- `parts/`: the tiny CLIP config and the 32K BPE tokenizer of `data_check.py` (256 image tokens an image).

Then, each in a fresh process (so its peak resident memory is its own):

- `inmemory N`: `lvit.data.dataset.prepare` (what `lvit finetune` runs before its first step: every record read,
  every distinct image's header read, every sample measured in tokens, the training dataset built): wall time and
  peak memory (`ru_maxrss`);
- `streamed N K`: `lvit.data.stream.dataset.StreamedData` over the shards (shuffle buffer 1000): the time to its
  first sample, and the peak memory after K samples (each read, checked and measured as it is met).

    python benchmarks/data_scale.py --records 1000000 5000000 --streamed 200000 1000000 --limit-gib 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_check import write_data, write_parts  # noqa: E402

SHARD = 100_000


def write(out: Path, sizes: list[int], images: int) -> None:
    """The base 100K records (data_check's generator), repeated with new ids up to each size, as one JSON Lines file and
    as shards."""
    base_file = out / "data.json"
    if not base_file.exists():
        _, _, words = write_data(out, 100_000, images)
        write_parts(out, words)
    base = json.loads(base_file.read_text())
    lines = [json.dumps(r) for r in base]
    for n in sizes:
        data, shards = out / f"data-{n}.jsonl", out / f"shards-{n}"
        if data.exists():
            continue
        shards.mkdir(exist_ok=True)
        start = time.perf_counter()
        with data.open("w") as f:
            part = None
            for i in range(n):
                if i % SHARD == 0:
                    part = (shards / f"part-{i // SHARD:05d}.jsonl").open("w")
                line = lines[i % len(lines)]
                if i >= len(lines):  # a new id for each repeat
                    line = line.replace('"id": "', f'"id": "r{i // len(lines)}-', 1)
                f.write(line + "\n")
                part.write(line + "\n")
                if i % SHARD == SHARD - 1 or i == n - 1:
                    part.close()
        mib = data.stat().st_size / 2**20
        print(f"wrote {n:,} records ({mib:,.0f} MiB) in {time.perf_counter() - start:.0f} s")


def _encoder(out: Path):
    from lvit.model.encoder import conversation_encoder
    from lvit.model.processor import load_tokenizer
    from lvit.model.towers import vision_config_of

    tokenizer = load_tokenizer(str(out / "parts" / "tiny-vicuna"))
    return conversation_encoder("vicuna_v1", tokenizer, vision_config_of(str(out / "parts" / "tiny-clip")))


def measure_inmemory(out: Path, n: int) -> dict:
    from lvit.data.dataset import prepare
    from lvit.recipe.schema import DataSection

    encoder = _encoder(out)
    data = DataSection(path=str(out / f"data-{n}.jsonl"), image_folder=str(out / "images"), on_bad_record="skip")
    start = time.perf_counter()
    prepared = prepare(data, encoder)
    return {"records": prepared.total, "kept": len(prepared.dataset), "seconds": time.perf_counter() - start}


def measure_streamed(out: Path, n: int, k: int) -> dict:
    from lvit.data.stream.dataset import StreamedData
    from lvit.recipe.schema import DataSection

    encoder = _encoder(out)
    data = DataSection(
        path=str(out / f"shards-{n}"), image_folder=str(out / "images"), on_bad_record="skip", streaming=True
    )
    start = time.perf_counter()
    stream = iter(StreamedData(data, {"vicuna_v1": encoder}, seed=0))
    next(stream)
    first = time.perf_counter() - start
    rss_at = {}
    for i in range(1, k):
        next(stream)
        if i + 1 in (k // 10, k):
            rss_at[i + 1] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    took = time.perf_counter() - start
    return {"first_sample_s": first, "samples": k, "seconds": took, "peak_mib_at": rss_at}


def child(out: Path, args: list[str], limit_gib: float | None = None) -> dict:
    """Run one measurement in a fresh process; its result and its peak resident memory."""
    limit = ["--limit-gib", str(limit_gib)] if limit_gib else []
    command = [sys.executable, __file__, "--out", str(out), *limit, "--child", *args]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/lvit-data-scale-bench"))
    parser.add_argument("--records", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--streamed", type=int, nargs="+", default=[200_000], help="Samples the streamed path reads.")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument(
        "--limit-gib",
        type=float,
        default=None,
        help="Cap each measurement's memory (address space); a MemoryError is reported.",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out
    if args.child:
        kind, *numbers = args.child
        if args.limit_gib:
            cap = int(args.limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:
            if kind == "inmemory":
                result = measure_inmemory(out, int(numbers[0]))
            else:
                result = measure_streamed(out, int(numbers[0]), int(numbers[1]))
        except MemoryError:
            result = {"error": f"MemoryError within {args.limit_gib} GiB"}
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    out.mkdir(parents=True, exist_ok=True)
    write(out, args.records, args.images)
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    for n in args.records:
        r = child(out, ["inmemory", str(n)], args.limit_gib)
        if "error" in r:
            print(f"in memory, {n:,} records: {r['error']} (peak {r['peak_mib']:,.0f} MiB when it stopped)")
            continue
        print(
            f"in memory, {n:,} records: prepare {r['seconds']:.0f} s before the first step, peak {r['peak_mib']:,.0f} "
            f"MiB ({r['kept']:,} kept)"
        )
    n = max(args.records)
    for k in args.streamed:
        r = child(out, ["streamed", str(n), str(k)], args.limit_gib)
        at = ", ".join(f"{mib:,.0f} MiB after {int(s):,}" for s, mib in r["peak_mib_at"].items())
        print(
            f"streamed over {n:,} records: first sample after {r['first_sample_s']:.2f} s; {k:,} samples in "
            f"{r['seconds']:.0f} s ({k / r['seconds']:,.0f}/s, one reader); peak {r['peak_mib']:,.0f} MiB ({at})"
        )


if __name__ == "__main__":
    main()
