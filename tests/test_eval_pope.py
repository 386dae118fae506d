"""`lvit eval pope`: LLaVA's yes/no extraction and POPE's metrics, on hand-computed fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.eval.metrics import score_answers
from lvit.eval.pope import category_of, pope_metrics, score, yes_no

# split: [(label, raw output)], question ids 1..n in each split (they repeat across splits, as in POPE)
SPLITS = {
    # preds yes no yes / no yes no  -> TP 2 (1, 3), FN 1 (2), TN 2 (4, 6), FP 1 (5)
    # accuracy 4/6, precision 2/3, recall 2/3, F1 2/3, yes-ratio 3/6
    "adversarial": [
        ("yes", "Yes, there is a dog."),
        ("yes", "No."),
        ("yes", "Yes"),
        ("no", "There is not a cat in the image."),
        ("no", "Yes, I think so."),
        ("no", "no"),
    ],
    # all yes -> TP 2, FP 2: accuracy 1/2, precision 1/2, recall 1, F1 2/3, yes-ratio 1
    "random": [("yes", "Yes"), ("no", "Yes"), ("yes", "Yes. There is no cat."), ("no", "Nope, yes")],
    # all no -> TN 1, FN 1: accuracy 1/2; no "yes" predicted: precision, recall, F1 0 (LLaVA divides by zero)
    "popular": [("yes", "No"), ("no", "No, not at all.")],
}
EXPECTED = {
    "adversarial": dict(accuracy=4 / 6, precision=2 / 3, recall=2 / 3, f1=2 / 3, yes_ratio=0.5, tp=2, fp=1, tn=2, fn=1),
    "random": dict(accuracy=0.5, precision=0.5, recall=1.0, f1=2 / 3, yes_ratio=1.0, tp=2, fp=2, tn=0, fn=0),
    "popular": dict(accuracy=0.5, precision=0.0, recall=0.0, f1=0.0, yes_ratio=0.0, tp=0, fp=0, tn=1, fn=1),
    # pooled: TP 4, FP 3, TN 3, FN 2 -> accuracy 7/12, precision 4/7, recall 4/6,
    # F1 = 2 (4/7)(2/3) / (4/7 + 2/3) = (16/21) / (26/21) = 8/13, yes-ratio 7/12
    "all": dict(accuracy=7 / 12, precision=4 / 7, recall=2 / 3, f1=8 / 13, yes_ratio=7 / 12, tp=4, fp=3, tn=3, fn=2),
}


def test_yes_no_is_llavas_rule():
    # first sentence only, commas removed, split on spaces; "No" / "not" / "no" as a word -> no
    assert [yes_no(t) for t in ("No, there is none.", "There is not.", "no", "Yes. There is no cat.")] == [
        "no",
        "no",
        "no",
        "yes",
    ]
    # and LLaVA's quirks, kept: only those exact words count
    assert [yes_no(t) for t in ("Nope.", "NO", "No\nthere", "", "I cannot tell")] == ["yes"] * 5


def test_metrics_hand_computed():
    for split, rows in SPLITS.items():
        metrics = pope_metrics([out for _, out in rows], [label for label, _ in rows])
        for key, value in EXPECTED[split].items():
            assert metrics[key] == pytest.approx(value), (split, key)
        assert metrics["total"] == len(rows)


def write_split_files(folder: Path, image: str = "x.png") -> list[Path]:
    paths = []
    for split, rows in SPLITS.items():
        path = folder / f"coco_pope_{split}.json"
        path.write_text(
            "".join(
                json.dumps({"question_id": i + 1, "image": image, "text": "Is there a cat in the image?", "label": lab})
                + "\n"
                for i, (lab, _) in enumerate(rows)
            )
        )
        paths.append(path)
    return paths


def test_scoring_only_cli(tmp_path):
    files = write_split_files(tmp_path)
    predictions = tmp_path / "answers.jsonl"
    predictions.write_text(
        "".join(
            json.dumps({"id": f"{split}-{i + 1}", "answer": out}) + "\n"
            for split, rows in SPLITS.items()
            for i, (_, out) in enumerate(rows)
        )
    )
    args = ["eval", "pope", "--predictions", str(predictions)]
    result = CliRunner().invoke(app, [*args, *[a for f in files for a in ("--annotations", str(f))]])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "answers_results.json").read_text())
    for split, expected in EXPECTED.items():
        got = saved["all"] if split == "all" else saved["splits"][split]
        assert {k: got[k] for k in expected} == pytest.approx(expected), split
    row = next(line.split() for line in result.output.splitlines() if line.startswith("adversarial"))
    assert row == ["adversarial", "66.67", "66.67", "66.67", "66.67", "50.00", "6"]
    # a folder of split files works the same
    again = CliRunner().invoke(app, [*args, "--annotations", str(tmp_path), "--out", str(tmp_path / "r")])
    assert again.exit_code == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["splits"] == saved["splits"]
    # --out is a folder, as its help says: an existing file there is refused, before anything is scored
    file_out = str(tmp_path / "answers_results.json")
    refused = CliRunner().invoke(app, [*args, "--annotations", str(tmp_path), "--out", file_out])
    assert refused.exit_code == 2 and "is a file; --out names the folder" in refused.output


def test_llava_answer_file_for_one_split(tmp_path):
    (file,) = [f for f in write_split_files(tmp_path) if category_of(f) == "random"]
    predictions = tmp_path / "llava.jsonl"
    predictions.write_text(
        "".join(json.dumps({"question_id": i + 1, "text": out}) + "\n" for i, (_, out) in enumerate(SPLITS["random"]))
    )
    result = CliRunner().invoke(app, ["eval", "pope", "--annotations", str(file), "--predictions", str(predictions)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "llava_results.json").read_text())["splits"]["random"]["recall"] == 1.0


def test_missing_predictions_are_an_error(tmp_path):
    files = write_split_files(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "pope",
            "--annotations",
            str(files[0]),
            "--annotations",
            str(files[1]),
            "--predictions",
            str(_write(tmp_path / "p.json", {"adversarial-1": "Yes"})),
        ],
    )
    assert result.exit_code == 2 and "no prediction for 5 of 6 'adversarial' questions" in result.output


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_in_training_metric():
    rows = [{"id": str(i), "answer": out, "reference": lab} for i, (lab, out) in enumerate(SPLITS["adversarial"])]
    assert score_answers("pope", rows)["accuracy"] == pytest.approx(4 / 6)


def test_generate_and_score_on_the_tiny_model(tiny_recipe, shapes_data, tmp_path):
    from lvit.train.run import run

    image = json.loads(Path(shapes_data["test"]).read_text())[0]["image"]
    files = write_split_files(tmp_path, image)
    model = run(tiny_recipe("finetune", out_dir=tmp_path / "run", training={"max_steps": 1}))
    out = tmp_path / "pope"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "pope",
            str(model),
            "--annotations",
            str(tmp_path),
            "--image-folder",
            str(shapes_data["images"]),
            "--out",
            str(out),
            "--max-new-tokens",
            "3",
            "--limit",
            "2",
            "--prompt-suffix",
            "\\nAnswer the question using a single word or phrase.",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    answers = {r["id"]: r for r in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    assert sorted(answers) == sorted(f"{s}-{i}" for s in SPLITS for i in (1, 2))  # --limit 2 per split
    assert (
        answers["random-1"]["prompt"]
        == "Is there a cat in the image?\nAnswer the question using a single word or phrase."
    )
    saved = json.loads((out / "results.json").read_text())
    splits = {
        s: [json.loads(line) for line in f.read_text().splitlines()][:2] for s, f in zip(SPLITS, files, strict=True)
    }
    assert saved["splits"] == json.loads(
        json.dumps(score(splits, {k: r["answer"] for k, r in answers.items()})["splits"])
    )
