"""Mixtures (`data.sources`, LLaVA-OneVision data YAMLs): the sources' shares, seeded and resumable draws, the loss
per source in `lvit_log.jsonl`, and the refusals of a recipe that cannot be mixed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lvit.data.mixture import Source, plan, sources_of
from lvit.data.mixture_sampler import MixtureSampler, epoch_rows, read_epoch
from lvit.errors import LvitError


def _sources(amounts: list[dict]) -> list[Source]:
    common = dict(format="auto", image_folder=None, template="vicuna_v1", on_bad_record="error", max_length=64)
    return [Source(name=f"s{i}", path=f"s{i}.json", overlong="truncate", **common, **a) for i, a in enumerate(amounts)]


def _plan(sizes: list[int], amounts: list[dict], samples=None):
    rows, start = [], 0
    for n in sizes:
        rows.append(list(range(start, start + n)))
        start += n
    return plan(_sources(amounts), rows, [list(range(n)) for n in sizes], sizes, samples)


def test_weights_are_realised_within_one_percent_at_10k_samples():
    mixture = _plan([3_000, 50_000, 8_000], [{"weight": 2}, {"weight": 5}, {"weight": 3}], samples=40_000)
    assert mixture.per_epoch == [8_000, 20_000, 12_000]
    source_of = {r: s for s, rows in enumerate(mixture.rows) for r in rows}
    sampler = MixtureSampler(mixture, seed=7)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        first = Counter(source_of[r] for r in list(sampler)[:10_000])
        shares = [first[s] / 10_000 for s in range(3)]
        assert shares == pytest.approx([0.2, 0.5, 0.3], abs=2e-4)  # stratified: within a sample of the share
    # the small source repeats (8000 draws of 3000 records), evenly: each record 2 or 3 times an epoch
    drawn = Counter(epoch_rows(mixture, 7, 0)[0])
    assert set(drawn.values()) == {2, 3} and len(drawn) == 3_000


def test_default_epoch_is_the_largest_without_repeats():
    mixture = _plan([100, 1_000], [{"weight": 0.2}, {"weight": 0.8}])
    assert mixture.per_epoch == [100, 400]  # 100 records at a share of 0.2: 500 samples
    assert all(len(set(rows)) == len(rows) for rows in epoch_rows(mixture, 0, 0))


def test_draws_are_seeded_and_rotate_through_a_subsampled_source():
    mixture = _plan([10, 25], [{}, {"count": 10}])
    a, b = MixtureSampler(mixture, seed=3), MixtureSampler(mixture, seed=3)
    assert list(a) == list(b) and len(a) == 20
    seen = []
    for epoch in range(5):  # 25 records, 10 an epoch: every record once before any repeats
        seen += epoch_rows(mixture, 3, epoch)[1]
    assert sorted(seen[:20]) == sorted(set(seen[:20])) and set(seen[:30]) == set(range(10, 35))
    assert epoch_rows(mixture, 3, 0)[0] == list(range(10))  # all: every record every epoch
    assert list(MixtureSampler(mixture, seed=4)) != list(a)


def test_first_and_last_select_by_file_order_the_same_every_epoch():
    # records 0..9 in the file; 3 and 7 did not pass the checks (rows hold the rest)
    kept = [i for i in range(10) if i not in (3, 7)]
    sources = _sources([{"count": 5, "select": "first"}, {"fraction": 0.3, "select": "last"}])
    mixture = plan(sources, [kept, [100 + i for i in kept]], [kept, kept], [10, 10])
    assert mixture.rows[0] == [0, 1, 2, 4] and mixture.rows[1] == [108, 109]
    assert epoch_rows(mixture, 0, 0) == epoch_rows(mixture, 0, 5)


def test_onevision_yaml_is_read_as_it_is(tmp_path, tiny_recipe, shapes_data):
    spec = {
        "datasets": [
            {"json_path": str(shapes_data["instruct"]), "sampling_strategy": "first:20"},
            {"json_path": str(shapes_data["captions"]), "sampling_strategy": "end:25%"},
            {"json_path": str(shapes_data["captions"]), "sampling_strategy": "random:7"},
            {"json_path": str(shapes_data["test"])},
        ]
    }
    path = tmp_path / "onevision.yaml"
    path.write_text(yaml.safe_dump(spec))
    recipe = tiny_recipe(data__path=str(path))
    sources = sources_of(recipe.data)
    assert [(s.name, s.count, s.fraction, s.select) for s in sources] == [
        ("instruct", 20, None, "first"),
        ("captions", None, 0.25, "last"),
        ("captions-2", 7, None, "random"),
        ("test", None, None, "random"),
    ]
    assert all(s.image_folder == recipe.data.image_folder for s in sources)
    path.write_text(yaml.safe_dump({"datasets": [{"json_path": "x.json", "sampling_strategy": "first2:10"}]}))
    with pytest.raises(LvitError, match=r"first2:10.*all, first:N, end:N or random:N"):
        sources_of(tiny_recipe(data__path=str(path)).data)


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([{"weight": 1}, {}], "some sources of data.sources have a weight"),
        ([{"weight": 1, "count": 3}, {"weight": 1}], r"sets weight and count"),
        ([{"count": 0}, {}], "count must be at least 1"),
        ([{"select": "first"}, {}], "select 'first' picks which records a count or fraction takes"),
        ([{"name": "a"}, {"name": "a"}], "name 'a' is used twice"),
        ([{"path": "nowhere.json"}, {}], r"data.sources\[0\].path = 'nowhere.json': file not found"),
    ],
)
def test_bad_mixtures_are_refused_by_key(tiny_recipe, shapes_data, sources, message):
    raw = [{"path": str(shapes_data["instruct"]), **s} for s in sources]
    recipe = tiny_recipe(data={"path": ..., "sources": raw})
    with pytest.raises(LvitError, match=message):
        sources_of(recipe.data, "r.yaml")


def test_path_and_sources_together_are_refused(tiny_recipe, shapes_data):
    with pytest.raises(LvitError, match="set data.path .* or data.sources .*; this recipe sets both"):
        tiny_recipe(data={"sources": [{"path": str(shapes_data["captions"])}]})


def _mixture_recipe(tiny_recipe, shapes_data, out: Path, **overrides):
    sources = [
        {"path": str(shapes_data["instruct"]), "name": "ours", "weight": 0.75},
        {"path": str(shapes_data["captions"]), "name": "captions", "weight": 0.25},
    ]
    return tiny_recipe(out_dir=out, data={"path": ..., "sources": sources}, **overrides)


def test_a_mixture_trains_and_logs_its_loss_per_source(tiny_recipe, shapes_data, tmp_path):
    from lvit.train.run import run

    held_out = {"ours": str(shapes_data["test"]), "captions": str(shapes_data["test"])}
    recipe = _mixture_recipe(
        tiny_recipe,
        shapes_data,
        tmp_path / "run",
        training={"max_steps": 4, "logging_steps": 2},
        eval={"data": held_out, "max_new_tokens": 4},
    )
    out = run(recipe)
    for name in held_out:  # one held-out set per source, each scored on its own
        results = json.loads((out / "eval" / name / "results.json").read_text())
        questions = len(json.loads(Path(held_out[name]).read_text()))
        assert (results["set"], results["data"], results["total"]) == (name, held_out[name], questions)
        assert len((out / "eval" / name / "answers.jsonl").read_text().splitlines()) == questions
    plan_file = json.loads((out / "mixture.json").read_text())
    # 53 instruct records at 0.75 and 48 captions at 0.25: 70 samples an epoch (53 / 0.75, rounded down), 53 + 17
    assert [(s["name"], s["per_epoch"]) for s in plan_file["sources"]] == [("ours", 53), ("captions", 17)]
    drawn = read_epoch(out, 0)
    assert {k: len(v) for k, v in drawn.items()} == {"ours": 53, "captions": 17}
    assert len(set(drawn["ours"])) == 53 and len(set(drawn["captions"])) == 17
    entries = [json.loads(line) for line in (out / "lvit_log.jsonl").read_text().splitlines()]
    logged = [e for e in entries if "loss" in e]
    assert [e["step"] for e in logged] == [2, 4]
    for e in logged:
        shares = [e["token_share/ours"], e["token_share/captions"]]
        assert sum(shares) == pytest.approx(1.0, abs=1e-9)
        weighted = shares[0] * e["loss/ours"] + shares[1] * e["loss/captions"]
        assert weighted == pytest.approx(e["loss"], rel=1e-6)
        assert e["samples/ours"] + e["samples/captions"] == 16  # 2 steps of 8
    assert sum(e.get("samples/ours", 0) + e.get("samples/captions", 0) for e in entries) == 32
    from lvit.train.history import source_names
    from lvit.train.summary import by_source

    assert source_names(entries) == ["ours", "captions"]  # a line each in lvit_loss.png
    summary = by_source(entries, ["ours", "captions"])  # the run summary's per-source lines
    assert [s["samples"] for s in summary] == [
        sum(e.get(f"samples/{n}", 0) for e in entries) for n in ("ours", "captions")
    ]
    assert [s["loss"] for s in summary] == [logged[-1]["loss/ours"], logged[-1]["loss/captions"]]

    from lvit.export.exporter import export

    exported = export(out, tmp_path / "export", dtype="fp32")  # its self-check prompts from the first source
    card = (tmp_path / "export" / "README.md").read_text()
    assert exported.sample.startswith("record ") and "instruct.json" in exported.sample  # a record of "ours"
    assert exported.max_abs_diff <= exported.tolerance
    assert "a mixture: " in card and "(weight 0.75)" in card


def test_dry_run_checks_each_source(tiny_recipe, shapes_data, tmp_path):
    from typer.testing import CliRunner

    from lvit.cli.app import app

    sources = [{"path": str(shapes_data["instruct"]), "name": "ours"}, {"path": str(shapes_data["captions"])}]
    path = tiny_recipe.write(tmp_path / "mix.yaml", out_dir=tmp_path / "out", data={"path": ..., "sources": sources})
    result = CliRunner().invoke(app, ["finetune", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "data: ours (all), captions (all)" in result.output
    assert "records of ours: 53 of 53 trainable" in result.output
    assert "records of captions: 48 of 48 trainable" in result.output


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_with_the_same_draws(tiny_recipe, shapes_data, tmp_path):
    import subprocess
    import sys

    import torch
    from conftest import kill_after_checkpoint
    from safetensors.torch import load_file

    from lvit.train.run import run

    def write(out: Path) -> Path:
        sources = [
            {"path": str(shapes_data["instruct"]), "name": "ours", "count": 20},
            {"path": str(shapes_data["captions"]), "name": "captions", "fraction": 0.5},
        ]
        raw = tiny_recipe.raw(
            out_dir=out,
            data={"path": ..., "sources": sources},
            global_batch_size=4,
            training={"max_steps": 16, "save_strategy": "steps", "save_steps": 4, "learning_rate": 1e-3},
        )
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    from lvit.recipe.load import load_recipe

    reference = run(load_recipe(write(tmp_path / "reference")))  # 44 draws an epoch: 11 steps, then epoch 1
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "lvit", "finetune", str(write(out))]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    kill_after_checkpoint(command, out / "checkpoint-4")
    assert not (out / "model.safetensors").exists()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    for epoch in (0, 1):  # the same records of each source, each epoch
        assert read_epoch(out, epoch) == read_epoch(reference, epoch)
    assert read_epoch(out, 0)["ours"] != read_epoch(out, 1)["ours"]  # 20 of 53: the next ones in epoch 1

    def steps(folder):
        return {e["step"]: e for e in map(json.loads, (folder / "lvit_log.jsonl").read_text().splitlines())}

    a, b = steps(reference), steps(out)
    assert sorted(b) == sorted(a) == list(range(1, 17))
    for step in range(1, 17):  # each step drew as many samples and tokens of each source
        assert {k: v for k, v in b[step].items() if k.startswith(("samples/", "tokens/"))} == {
            k: v for k, v in a[step].items() if k.startswith(("samples/", "tokens/"))
        }
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
    wa, wb = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6, msg=key)


def test_data_check_and_preview_report_each_source(tiny_recipe, shapes_data, tmp_path):
    from typer.testing import CliRunner

    from lvit.cli.app import app

    records = json.loads(Path(shapes_data["captions"]).read_text())[:6]
    records[2]["image"] = "missing.png"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records))
    sources = [
        {"path": str(shapes_data["instruct"]), "name": "ours", "count": 10},
        {"path": str(broken), "name": "web", "template": "plain", "on_bad_record": "skip", "fraction": 0.5},
    ]
    path = tiny_recipe.write(tmp_path / "mix.yaml", data={"path": ..., "sources": sources})
    result = CliRunner().invoke(app, ["data", "check", "--recipe", str(path), "--json"])
    assert result.exit_code == 1, result.output  # the broken source has an error
    report = json.loads(result.output)
    assert [s["name"] for s in report["sources"]] == ["ours", "web"]
    ours, web = report["sources"]
    assert (ours["records"], ours["trainable"], ours["per_epoch"], ours["errors"]) == (53, 53, 10, 0)
    assert (web["records"], web["trainable"], web["per_epoch"], web["errors"]) == (6, 5, 3, 1)  # ceil(0.5 x 5)
    assert web["problems"][0]["index"] == 2 and web["problems"][0]["kind"] == "image_missing"
    assert report["samples_per_epoch"] == 13
    text = CliRunner().invoke(app, ["data", "check", "--recipe", str(path)]).output
    assert "=== source 'web': " in text and "(requested: 50.00% random, template plain)" in text
    assert "web: 3 of 5 records an epoch (23.1%" in text

    shown = CliRunner().invoke(app, ["data", "preview", str(path), "-n", "3", "--json"])
    assert shown.exit_code == 0, shown.output
    samples = json.loads(shown.output)
    first = [r["id"] for r in json.loads(Path(shapes_data["instruct"]).read_text())[:3]]
    assert [(s["source"], s["id"]) for s in samples] == [
        *[("ours", i) for i in first],
        ("web", "cap-0"),
        ("web", "cap-1"),
        ("web", records[2]["id"]),
    ]
    assert "image" in samples[-1]["refused"]
    from lvit.data.check import encoder_from_recipe

    plain = encoder_from_recipe(tiny_recipe(data={"path": ..., "sources": sources}), "plain")
    assert samples[3]["input_ids"] == plain.encode(_conversation(records[0])).input_ids  # the source's own template


def _conversation(record):
    from lvit.data.normalise import normalise

    return normalise(record, 0, None, True).conversation


def test_the_shipped_mixture_recipe_dry_runs_with_local_parts(tiny_parts, shapes_data, tmp_path):
    from typer.testing import CliRunner

    from lvit.cli.app import app
    from lvit.recipe.catalog import RECIPES_DIR

    vision, lm = tiny_parts
    images = shapes_data["images"]
    sources = (
        f"[{{name: ours, path: {shapes_data['captions']}, image_folder: {images}, weight: 0.25}}, "
        f"{{name: llava665k, path: {shapes_data['instruct']}, image_folder: {images}, weight: 0.75}}]"
    )
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            str(RECIPES_DIR / "llava15_stage2_mixture.yaml"),
            "--dry-run",
            f"model.vision_tower={vision}",
            f"model.language_model={lm}",
            f"model.projector_from={tmp_path}",
            f"data.sources={sources}",
            f"training.output_dir={tmp_path / 'out'}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "data: ours (weight 0.25), llava665k (weight 0.75)" in result.output
    assert "records of ours: 48 of 48 trainable" in result.output and "dry run passed" in result.output


def test_modality_grouping_and_the_token_budget_work_over_a_mixtures_draws():
    from lvit.data.token_budget import TokenBudgetBatchSampler

    mixture = _plan([30, 50], [{"weight": 1}, {"weight": 1}], samples=60)
    has_image = [r % 3 != 0 for r in range(80)]  # every third row text-only
    sampler = MixtureSampler(mixture, seed=1, arrange="modality", has_image=has_image, step_size=8)
    order = list(sampler)
    assert sorted(order) == sorted(r for rows in epoch_rows(mixture, 1, 0) for r in rows)
    steps = [order[i : i + 8] for i in range(0, len(order) - len(order) % 8, 8)]
    mixed = [s for s in steps if len({has_image[r] for r in s}) > 1]
    assert len(mixed) <= 1  # single-modality steps, as without a mixture (at most the leftovers mix)
    lengths = [10 + r % 7 for r in range(80)]
    pool = [r for rows in epoch_rows(mixture, 1, 0) for r in rows]
    budget = TokenBudgetBatchSampler(lengths, [str(r) for r in range(80)], 40, seed=1, pool=pool)
    assert sorted(r for b in budget.batches for r in b) == sorted(pool)  # the first epoch's draws, each once
    assert all(sum(lengths[r] for r in b) <= 40 for b in budget.batches)
