"""`data.streaming`: WebDataset / JSON Lines / parquet shards read as training goes, a corrupt sample skipped and
listed, the same steps as the in-memory run on the same data, and a kill -9 resumed at the same sample."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml

from lvit.data.stream.shards import list_shards, read_shard
from lvit.errors import LvitError

CORRUPT = 3  # the record whose image is not an image


def _records(shapes_data, n: int = 25) -> list[dict]:
    records = json.loads(Path(shapes_data["instruct"]).read_text())
    return [r for r in records if "image" in r][: n - 2] + [r for r in records if "image" not in r][:2]


def _write_shards(records: list[dict], images: Path, folder: Path, per_shard: int = 6, corrupt: int = CORRUPT) -> Path:
    folder.mkdir(parents=True)
    for s in range(0, len(records), per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:03d}.tar", "w") as tar:
            for i, record in enumerate(records[s : s + per_shard], s):
                members = {f"{record['id']}.json": json.dumps({k: v for k, v in record.items() if k != "image"})}
                if "image" in record:
                    data = b"not an image" if i == corrupt else (images / record["image"]).read_bytes()
                    members[f"{record['id']}.png"] = data
                for name, data in members.items():
                    data = data.encode() if isinstance(data, str) else data
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def _in_memory_copy(records: list[dict], images: Path, tmp: Path) -> tuple[Path, Path]:
    """The same records as one JSON Lines file, the corrupt image a corrupt file."""
    folder = tmp / "images"
    folder.mkdir()
    lines = []
    for i, record in enumerate(records):
        if "image" in record:
            data = b"not an image" if i == CORRUPT else (images / record["image"]).read_bytes()
            (folder / record["image"]).write_bytes(data)
        lines.append(json.dumps(record))
    path = tmp / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, folder


def test_shards_are_read_sample_by_sample_from_any_start(shapes_data, tmp_path):
    records = _records(shapes_data, 12)
    kind, shards = list_shards(str(_write_shards(records, Path(shapes_data["images"]), tmp_path / "wds")))
    assert kind == "webdataset" and [Path(s).name for s in shards] == ["shard-000.tar", "shard-001.tar"]
    samples = list(read_shard(shards[0], kind))
    assert [s.key for s in samples] == [r["id"] for r in records[:6]]
    assert samples[0].record["image"].read() == (Path(shapes_data["images"]) / records[0]["image"]).read_bytes()
    assert [s.offset for s in read_shard(shards[0], kind, start=4)] == [4, 5]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"id": "x", "conversations": []}\n\nnot json\n')
    got = list(read_shard(str(jsonl), "jsonl"))
    assert [(s.offset, s.line, s.error is not None) for s in got] == [(0, 1, False), (1, 3, True)]
    (tmp_path / "b.json").write_text("[]")
    with pytest.raises(LvitError, match="a JSON list cannot be streamed"):
        list_shards(str(tmp_path / "b.json"))


def test_streaming_needs_max_steps_and_no_whole_dataset_order(tiny_recipe, tmp_path):
    with pytest.raises(LvitError, match="data.streaming .* set training.max_steps"):
        tiny_recipe(data__streaming=True, training={"max_steps": ...})
    with pytest.raises(LvitError, match="data.group_by_modality_length orders the batches over the whole dataset"):
        tiny_recipe(data__streaming=True, data__group_by_modality_length=True)


def _streamed_recipe(tiny_recipe, path, out: Path, **data):
    return tiny_recipe.raw(
        out_dir=out,
        data={"path": str(path), "streaming": True, "on_bad_record": "skip", **data},
        global_batch_size=8,
        training={"max_steps": 6, "learning_rate": 1e-3},
    )


def test_a_streamed_run_trains_the_same_steps_as_the_in_memory_run(tiny_recipe, shapes_data, tmp_path):
    from lvit.train.run import run

    records = _records(shapes_data)
    shards = _write_shards(records, Path(shapes_data["images"]), tmp_path / "wds")
    streamed = run(tiny_recipe.recipe_from_raw(_streamed_recipe(tiny_recipe, shards, tmp_path / "s", shuffle_buffer=0)))
    path, images = _in_memory_copy(records, Path(shapes_data["images"]), tmp_path)
    in_memory = run(
        tiny_recipe(
            out_dir=tmp_path / "m",
            data={"path": str(path), "image_folder": str(images), "on_bad_record": "skip"},
            global_batch_size=8,
            training={"max_steps": 6, "learning_rate": 1e-3, "train_sampling_strategy": "sequential"},
        )
    )

    def log(out):
        return [json.loads(line) for line in (out / "lvit_log.jsonl").read_text().splitlines()]

    a, b = log(streamed), log(in_memory)
    assert [e["step"] for e in a] == [e["step"] for e in b] == list(range(1, 7))
    assert [e["num_tokens"] for e in a] == [e["num_tokens"] for e in b]  # the same samples, step by step
    assert [e["loss"] for e in a] == pytest.approx([e["loss"] for e in b], rel=1e-5)
    skipped = [json.loads(line) for line in (streamed / "skipped_records.jsonl").read_text().splitlines()]
    # 24 trainable samples: 3 steps a pass, two passes; the corrupt one met (and listed) once per pass
    assert {(s["id"], s["kind"]) for s in skipped} == {(records[CORRUPT]["id"], "image_unreadable")}
    assert "sample " in skipped[0]["reason"] and "shard-000.tar" in skipped[0]["reason"]


@pytest.mark.slow
def test_a_killed_streamed_run_resumes_at_the_same_sample(tiny_recipe, shapes_data, tmp_path):
    import os
    import subprocess
    import sys

    import torch
    from conftest import kill_after_checkpoint
    from safetensors.torch import load_file

    from lvit.train.run import run

    records = _records(shapes_data)
    shards = _write_shards(records, Path(shapes_data["images"]), tmp_path / "wds")

    def write(out: Path) -> Path:
        raw = _streamed_recipe(tiny_recipe, shards, out, shuffle_buffer=5)
        raw["training"].update({"max_steps": 10, "save_strategy": "steps", "save_steps": 3})
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    reference = run(tiny_recipe.recipe_from_raw(yaml.safe_load(write(tmp_path / "reference").read_text())))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "lvit", "finetune", str(write(out))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kill_after_checkpoint(command, out / "checkpoint-3")
    assert (out / "checkpoint-3" / "lvit_data_position-rank0.pt").is_file()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the data continues where checkpoint-" in again.stderr

    def steps(folder):
        return {e["step"]: e for e in map(json.loads, (folder / "lvit_log.jsonl").read_text().splitlines())}

    a, b = steps(reference), steps(out)
    assert sorted(b) == sorted(a) == list(range(1, 11))
    resumed_at = int(again.stderr.split("resuming from ")[1].split("checkpoint-")[1].split()[0].strip(".,"))
    for step in range(resumed_at + 1, 11):  # TRL's num_tokens restarts: compare what each step added
        added = [s[step]["num_tokens"] - (s[step - 1]["num_tokens"] if step - 1 > resumed_at else 0) for s in (b,)]
        assert added[0] == a[step]["num_tokens"] - a[step - 1]["num_tokens"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
    wa, wb = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_two_workers_resume_at_their_own_places(tiny_recipe, shapes_data, tmp_path):
    """Each data-loader worker reads its own shards; the checkpoint holds both places (torchdata's StatefulDataLoader),
    so a run resumed from checkpoint-2 trains steps 3-4 on the samples the straight run did."""
    from conftest import assert_resumed_steps_match

    shards = _write_shards(_records(shapes_data), Path(shapes_data["images"]), tmp_path / "wds")

    def recipe(out):
        raw = _streamed_recipe(tiny_recipe, shards, out, shuffle_buffer=4)
        raw["training"].update({"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "dataloader_num_workers": 2})
        return tiny_recipe.recipe_from_raw(raw)

    assert_resumed_steps_match(recipe, tmp_path)
    assert (tmp_path / "resumed" / "checkpoint-4" / "lvit_data_position-rank0.pt").is_file()


def test_a_streamed_mixture_keeps_its_weights_and_resumes_mid_block(tiny_parts, tmp_path):
    from lvit.data.stream.dataset import StreamedData
    from lvit.model.processor import load_tokenizer
    from lvit.recipe.schema import DataSection, SourceSection
    from lvit.templates.encoder import ConversationEncoder

    tokenizer = load_tokenizer(tiny_parts[1])
    encoder = ConversationEncoder("vicuna_v1", tokenizer, tokenizer.convert_tokens_to_ids("<image>"), 16)
    for name, n in (("ours", 300), ("web", 2000)):
        (tmp_path / name).mkdir()
        for shard in range(2):
            lines = [
                json.dumps(
                    {
                        "id": f"{name}-{shard}-{i}",
                        "conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}"}],
                    }
                )  # fmt: skip
                for i in range(n // 2)
            ]
            (tmp_path / name / f"part-{shard}.jsonl").write_text("\n".join(lines) + "\n")
    sources = [
        SourceSection(path=str(tmp_path / "ours"), weight=0.3),
        SourceSection(path=str(tmp_path / "web"), weight=0.7),
    ]
    data = DataSection(sources=sources, streaming=True, shuffle_buffer=64, max_length=64)

    def rows(dataset, n):
        it = iter(dataset)
        return [next(it) for _ in range(n)]

    dataset = StreamedData(data, {"vicuna_v1": encoder}, seed=5)
    first = rows(dataset, 10_000)
    ours = sum(r["source"] == 0 for r in first)
    assert abs(ours - 3_000) <= 1  # 30% to within a draw; "ours" went round 10 times
    assert len({r["id"] for r in first if r["source"] == 0}) == 300
    # stopped after 3,456 rows (mid-shuffle-block), resumed from its state: the same rows follow
    again = StreamedData(data, {"vicuna_v1": encoder}, seed=5)
    it = iter(again)
    for _ in range(3_456):
        next(it)
    state = again.state_dict()
    resumed = StreamedData(data, {"vicuna_v1": encoder}, seed=5)
    resumed.load_state_dict(state)
    assert [r["id"] for r in rows(resumed, 500)] == [r["id"] for r in first[3_456:3_956]]


def test_parquet_shards_stream_with_their_embedded_images(shapes_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = _records(shapes_data, 10)[:8]
    images = Path(shapes_data["images"])
    table = pa.Table.from_pylist(
        [
            {
                "id": r["id"],
                "conversations": r["conversations"],
                "image": {"bytes": (images / r["image"]).read_bytes(), "path": r["image"]},
            }
            for r in records
        ]
    )
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=3)
    kind, shards = list_shards(str(tmp_path / "*.parquet"))
    got = list(read_shard(shards[0], kind, start=4))  # the first row group is passed over unread
    assert kind == "parquet" and [s.offset for s in got] == [4, 5, 6, 7]
    assert [s.record["id"] for s in got] == [r["id"] for r in records[4:]]
    assert got[0].record["image"].read() == (images / records[4]["image"]).read_bytes()


@pytest.mark.slow
def test_two_processes_read_their_own_shards(tiny_recipe, shapes_data, tmp_path):
    import os
    import subprocess
    import sys

    import torch

    shards = _write_shards(_records(shapes_data), Path(shapes_data["images"]), tmp_path / "wds")
    raw = _streamed_recipe(tiny_recipe, shards, tmp_path / "out", shuffle_buffer=4)
    raw["training"].update({"max_steps": 3, "save_strategy": "steps", "save_steps": 3})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*launch, "-m", "lvit", "finetune", str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    def reader_states(rank):
        state = torch.load(tmp_path / "out" / "checkpoint-3" / f"lvit_data_position-rank{rank}.pt", weights_only=True)
        found = []

        def walk(node):
            if isinstance(node, dict):
                if "parts" in node and "sources" in node:
                    found.append(node)
                for value in node.values():
                    walk(value)

        walk(state)
        return found

    zero, one = reader_states(0), reader_states(1)
    assert zero and one and all(s["parts"] == 2 for s in zero + one)
    assert zero != one  # each rank at its own place in its own shards


def test_check_preview_and_dry_run_read_streamed_data_shard_by_shard(tiny_recipe, shapes_data, tmp_path):
    from typer.testing import CliRunner

    from lvit.cli.app import app

    records = _records(shapes_data)
    shards = _write_shards(records, Path(shapes_data["images"]), tmp_path / "wds")
    raw = _streamed_recipe(tiny_recipe, f"{shards}/*.tar", tmp_path / "out")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    checked = runner.invoke(app, ["data", "check", "--recipe", str(path), "--json"])
    assert checked.exit_code == 1, checked.output
    (source,) = json.loads(checked.output)["sources"]
    assert (source["shards"], source["records"], source["trainable"]) == (5, 25, 24)
    (problem,) = source["problems"]
    assert problem["kind"] == "image_unreadable" and problem["id"] == records[CORRUPT]["id"]
    assert f"sample {records[CORRUPT]['id']!r} of shard-000.tar" in problem["where"]
    text = runner.invoke(app, ["data", "check", "--recipe", str(path)]).output
    assert "(5 webdataset shard(s)) ===" in text and "records 25, trainable 24, problems: image_unreadable 1" in text

    shown = json.loads(runner.invoke(app, ["data", "preview", str(path), "-n", "5", "--json"]).output)
    assert [s["id"] for s in shown] == [r["id"] for r in records[:5]]
    assert "refused" in shown[CORRUPT] and all("input_ids" in s for i, s in enumerate(shown) if i != CORRUPT)

    dry = runner.invoke(app, ["finetune", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "(streamed, 5 webdataset shard(s); the first 25 checked): 24 trainable, 1 left out (image_unreadable 1)" in (
        dry.output
    )


def test_a_bad_sample_stops_the_run_and_the_resumed_run_retakes_that_step_whole(tiny_recipe, shapes_data, tmp_path):
    """on_bad_record: error stops at the step holding the corrupt sample (step 3 of 8-sample steps, files' order); the
    checkpoint keeps the data position of that step's start, so the same command with on_bad_record=skip trains
    exactly what a run skipping from the start trains."""
    from lvit.errors import Stopped
    from lvit.train.run import run

    shards = _write_shards(_records(shapes_data), Path(shapes_data["images"]), tmp_path / "wds", corrupt=20)

    def recipe(out, on_bad):
        raw = _streamed_recipe(tiny_recipe, shards, out, shuffle_buffer=0, on_bad_record=on_bad)
        raw["training"].update({"max_steps": 5, "save_strategy": "steps", "save_steps": 1})
        return tiny_recipe.recipe_from_raw(raw)

    reference = run(recipe(tmp_path / "reference", "skip"))
    with pytest.raises(Stopped, match="sample .* of shard-003.tar"):
        run(recipe(tmp_path / "stopped", "error"))
    resumed = run(recipe(tmp_path / "stopped", "skip"))

    def losses(out):
        return [e["loss"] for e in map(json.loads, (out / "lvit_log.jsonl").read_text().splitlines()) if "loss" in e]

    assert losses(resumed) == pytest.approx(losses(reference), rel=1e-5) and len(losses(reference)) == 5
