"""`lvit eval scienceqa`: LLaVA's answer parsing, the official categories, hand-computed scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.eval.metrics import score_answers
from lvit.eval.scienceqa_score import FAILED, categories, parse_answer, predicted_index, score


def problem(subject, hint, image, grade, n_choices, answer):
    return {
        "question": "Which one?",
        "choices": [f"choice {i}" for i in range(n_choices)],
        "answer": answer,
        "hint": hint,
        "image": image,
        "subject": subject,
        "grade": grade,
        "lecture": "",
        "solution": "",
    }


NAT, SOC, LAN, IMG = "natural science", "social science", "language science", "image.png"

# Ten test problems: (problem, raw output or None when missing, right?). Categories by the official
# definitions: TXT = non-empty hint, IMG = has an image, NO = neither; grade1-6 / grade7-12.
CASES = {
    # pid: (problem(subject, hint, image, grade, choices, answer), output, right?)   # categories: why
    "1": (problem(NAT, "", IMG, "grade3", 3, 1), "B", True),  # NAT IMG G1-6: a bare letter
    "2": (problem(NAT, "A hint.", None, "grade8", 2, 0), "A. choice 0", True),  # NAT TXT G7-12: "X. " prefix
    "3": (problem(SOC, "", None, "grade5", 4, 2), "So. The answer is C.", True),  # SOC NO G1-6: one "The answer is"
    # SOC TXT IMG G7-12: two "The answer is" matches
    "4": (problem(SOC, "h", IMG, "grade10", 3, 0), "The answer is A. The answer is B.", False),
    "5": (problem(LAN, "", None, "grade2", 2, 1), "D", False),  # LAN NO G1-6: a letter beyond the 2 choices
    "6": (problem(LAN, "x", None, "grade11", 3, 2), "c", False),  # LAN TXT G7-12: lower case
    "7": (problem(NAT, "", IMG, "grade7", 2, 0), "The answer is A", False),  # NAT IMG G7-12: no char after the letter
    "8": (problem(SOC, "", None, "grade12", 3, 1), "The answer is B, surely", True),  # SOC NO G7-12: "." is any char
    "9": (problem(NAT, "", None, "grade1", 2, 0), None, False),  # NAT NO G1-6: no prediction
    "10": (problem(LAN, "", IMG, "grade6", 3, 1), "C. choice 2", False),  # LAN IMG G1-6: parsed, wrong letter
}
# By hand: right = 1, 2, 3, 8 -> 4 / 10.
#   NAT {1,2,7,9}: 1,2 -> 2/4      SOC {3,4,8}: 3,8 -> 2/3       LAN {5,6,10}: 0/3
#   TXT {2,4,6}: 2 -> 1/3          IMG {1,4,7,10}: 1 -> 1/4      NO {3,5,8,9}: 3,8 -> 2/4
#   G1-6 {1,3,5,9,10}: 1,3 -> 2/5  G7-12 {2,4,6,7,8}: 2,8 -> 2/5
#   no valid choice index (failed): 4, 5, 6, 7, 9 -> 5; missing: 9 -> 1
EXPECTED = {
    "NAT": (2, 4),
    "SOC": (2, 3),
    "LAN": (0, 3),
    "TXT": (1, 3),
    "IMG": (1, 4),
    "NO": (2, 4),
    "G1-6": (2, 5),
    "G7-12": (2, 5),
}


@pytest.fixture()
def sqa_files(tmp_path):
    problems = {pid: p for pid, (p, _, _) in CASES.items()}
    problems["11"] = problem(NAT, "", None, "grade1", 2, 0)  # a val problem: never scored as test
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(CASES), "val": ["11"]}))
    outputs = {pid: out for pid, (_, out, _) in CASES.items() if out is not None}
    outputs["11"] = "A"
    (tmp_path / "outputs.json").write_text(json.dumps(outputs))
    return tmp_path


def test_parse_answer_llava_rules():
    assert parse_answer("B") == "B" and parse_answer(" B\n") == "B"
    assert parse_answer("C. a cat") == "C" and parse_answer("C.a cat") == FAILED
    assert parse_answer("So. The answer is D.") == "D" and parse_answer("The answer is E!") == "E"
    assert parse_answer("The answer is A. Or: The answer is A.") == FAILED  # exactly one match
    assert parse_answer("the answer is A.") == FAILED and parse_answer("(A)") == FAILED and parse_answer("") == FAILED
    assert predicted_index("C", 3) == 2 and predicted_index("D", 3) == -1 and predicted_index(FAILED, 5) == -1


def test_categories_official_definitions():
    assert categories(problem(NAT, "hint", IMG, "grade4", 2, 0)) == ["NAT", "TXT", "IMG", "G1-6"]
    assert categories(problem(LAN, "", None, "grade12", 2, 0)) == ["LAN", "NO", "G7-12"]
    assert categories(problem(SOC, None, IMG, "grade7", 2, 0)) == ["SOC", "IMG", "G7-12"]


def test_score_hand_computed():
    problems = {pid: p for pid, (p, _, _) in CASES.items()}
    outputs = {pid: out for pid, (_, out, _) in CASES.items() if out is not None}
    scores = score(problems, list(CASES), outputs)
    assert (scores["correct"], scores["total"]) == (4, 10) and scores["accuracy"] == pytest.approx(0.4)
    assert scores["failed"] == 5 and scores["missing"] == 1
    for cat, (right, total) in EXPECTED.items():
        bucket = scores["categories"][cat]
        assert (bucket["correct"], bucket["total"]) == (right, total), cat
        assert bucket["accuracy"] == pytest.approx(right / total)
    assert {pid for pid, (_, _, ok) in CASES.items() if ok} == {
        pid for pid, idx in scores["results"].items() if idx == CASES[pid][0]["answer"]
    }


def test_scoring_only_cli(sqa_files):
    d = sqa_files
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "scienceqa",
            "--problems",
            str(d / "problems.json"),
            "--splits",
            str(d / "pid_splits.json"),
            "--predictions",
            str(d / "outputs.json"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((d / "outputs_results.json").read_text())
    assert saved["benchmark"] == "scienceqa" and saved["split"] == "test"
    assert (saved["correct"], saved["total"]) == (4, 10)  # problem 11 (val) is not counted
    assert saved["categories"]["IMG"] == {"accuracy": 0.25, "correct": 1, "total": 4}
    lines = result.output.splitlines()
    assert any(line.split() == ["all", "40.00", "4", "10"] for line in lines), result.output
    assert any(line.split() == ["LAN", "0.00", "0", "3"] for line in lines)
    assert "unparsed outputs (counted wrong): 5; missing predictions: 1" in result.output


def test_cli_needs_model_or_predictions(sqa_files):
    d = sqa_files
    args = ["eval", "scienceqa", "--problems", str(d / "problems.json"), "--splits", str(d / "pid_splits.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "either MODEL" in result.output
    result = CliRunner().invoke(app, [*args, "--predictions", str(d / "outputs.json"), "--split", "train"])
    assert result.exit_code == 2 and "no split 'train'" in result.output


def test_in_training_metric_uses_the_references():
    rows = [
        {"id": "1", "answer": "The answer is B.", "reference": "Because. The answer is B."},
        {"id": "2", "answer": "A", "reference": "The answer is C."},
        {"id": "3", "answer": "I do not know", "reference": "The answer is A."},
        {"id": "4", "answer": "D. x", "reference": "D"},  # reference in the "letter" format
    ]
    assert score_answers("scienceqa", rows) == {"accuracy": 0.5, "correct": 2, "total": 4, "failed": 1}


def test_generate_and_score_on_the_tiny_model(tiny_recipe, shapes_data, sqa_files, tmp_path):
    """Full mode: questions in LLaVA's format (image problems with their images), answers, scores."""
    from lvit.data.scienceqa import build_question
    from lvit.train.run import run

    d = sqa_files
    images = sorted(Path(shapes_data["images"]).glob("*.png"))
    for i, (pid, (p, _, _)) in enumerate(CASES.items()):
        if p["image"]:
            (d / "images" / "test" / pid).mkdir(parents=True)
            shutil.copy(images[i], d / "images" / "test" / pid / "image.png")
    model = run(tiny_recipe("finetune", out_dir=tmp_path / "run", training={"max_steps": 1}))
    out = tmp_path / "sqa"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "scienceqa",
            str(model),
            "--problems",
            str(d / "problems.json"),
            "--splits",
            str(d / "pid_splits.json"),
            "--out",
            str(out),
            "--max-new-tokens",
            "5",
            "--answer-format",
            "letter",
            "--batch-size",
            "4",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert [q["id"] for q in questions] == list(CASES)
    assert questions[0]["image"] == "1/image.png" and "image" not in questions[1]
    answers = {r["id"]: r for r in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    assert answers["2"]["prompt"] == build_question(CASES["2"][0], "letter") and answers["2"]["reference"] == "A"
    # results.json: the scorer applied to the raw outputs beside it
    saved = json.loads((out / "results.json").read_text())
    problems = {pid: p for pid, (p, _, _) in CASES.items()}
    expected = score(problems, list(CASES), {pid: r["answer"] for pid, r in answers.items()})
    assert {k: saved[k] for k in expected} == json.loads(json.dumps(expected))
    assert saved["answer_format"] == "letter" and saved["missing"] == 0
