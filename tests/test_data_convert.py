"""`lvit data convert`: LLaVA <-> chat, Hugging Face datasets (embedded images written out), ScienceQA."""

from __future__ import annotations

import json

import pytest
from conftest import read_checked, save_llava_dataset
from PIL import Image
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.data.check import check_data
from lvit.data.reader import read_records
from lvit.data.scienceqa import SINGLE_LETTER_PROMPT, build_answer, build_prompt, build_question, to_record

LLAVA = [
    {
        "id": "a",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Where is it?"},
            {"from": "gpt", "value": "On the left."},
        ],
    },
    {"id": "b", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi {there}."}]},
    {
        "id": "c",
        "image": "sub/c.png",
        "conversations": [
            {"from": "system", "value": "Answer in one word."},
            {"from": "human", "value": "<image>\nColour?"},
            {"from": "gpt", "value": "Blue."},
        ],
    },
    {"id": "d", "image": "d.png",
     "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A cat."}]},
]  # fmt: skip


def convert(*args):
    return CliRunner().invoke(app, ["data", "convert", *map(str, args)])


def records_key(path, fmt="auto"):
    records, problems, total = read_records(path, fmt)
    assert problems == []
    return [(r.id, r.index, r.image, r.conversation) for r in records]


@pytest.mark.parametrize("chat_name", ["chat.jsonl", "chat.json"])
def test_llava_to_chat_to_llava_round_trip(tmp_path, chat_name):
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(LLAVA))
    result = convert(src, tmp_path / chat_name, "--to", "chat")
    assert result.exit_code == 0, result.output
    assert "4 of 4 records" in result.output
    text = (tmp_path / chat_name).read_text()
    chat = [json.loads(line) for line in text.splitlines()] if chat_name.endswith("l") else json.loads(text)
    assert chat[0] == {
        "id": "a",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
            {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "On the left."}]},
        ],
        "images": ["a.png"],
    }
    assert chat[1]["images"] == [] and chat[2]["messages"][0]["role"] == "system"
    assert chat[3]["messages"][0]["content"] == [{"type": "image"}]

    back = tmp_path / "back.json"
    assert convert(tmp_path / chat_name, back).exit_code == 0
    assert json.loads(back.read_text()) == LLAVA  # the same records, byte for byte as JSON values
    assert records_key(back) == records_key(tmp_path / chat_name) == records_key(src)

    lines = tmp_path / "back.jsonl"
    assert convert(tmp_path / chat_name, lines).exit_code == 0  # .jsonl: LLaVA JSON Lines
    assert [json.loads(line) for line in lines.read_text().splitlines()] == LLAVA


def test_placeholder_at_the_end_is_normalised(tmp_path):
    src = tmp_path / "end.json"
    src.write_text(json.dumps([{**LLAVA[0], "conversations": [{"from": "human", "value": "What colour is it?\n<image>"},
                                                              {"from": "gpt", "value": "Red."}]}]))  # fmt: skip
    out = tmp_path / "out.json"
    assert convert(src, out, "--to", "llava").exit_code == 0
    assert json.loads(out.read_text())[0]["conversations"][0]["value"] == "<image>\nWhat colour is it?"
    assert records_key(out) == records_key(src)


def test_bad_records_stop_the_conversion_unless_skipped(tmp_path):
    src = tmp_path / "bad.json"
    src.write_text(json.dumps([LLAVA[1], {"id": "bad", "conversations": []}]))
    result = convert(src, tmp_path / "out.json")
    assert result.exit_code == 2
    assert "1 record(s) cannot be converted" in result.output and "record #1 (id 'bad')" in result.output
    assert not (tmp_path / "out.json").exists()
    result = convert(src, tmp_path / "out.json", "--skip-bad")
    assert result.exit_code == 0 and "1 of 2 records" in result.output and "skipped record #1" in result.output
    assert json.loads((tmp_path / "out.json").read_text()) == [LLAVA[1]]


def test_hf_dataset_with_embedded_images_is_written_out(tmp_path):

    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    rows = [
        {"id": f"r{i}", "image": Image.new("RGB", (10, 8), colours[c]) if c else None,
         "conversations": [{"from": "human", "value": "<image>\nColour?" if c else "Colour?"},
                           {"from": "gpt", "value": c or "none"}]}
        for i, c in enumerate(["red", None, "blue"])
    ]  # fmt: skip
    save_llava_dataset(rows, tmp_path / "ds")
    out = tmp_path / "export" / "train.jsonl"
    result = convert(tmp_path / "ds", out)
    assert result.exit_code == 0, result.output
    images = tmp_path / "export" / "train_images"
    assert "2 embedded images written to" in result.output and str(images) in result.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("image") for r in written] == ["00000000.png", None, "00000002.png"]
    assert Image.open(images / "00000000.png").getpixel((3, 3)) == (255, 0, 0)
    assert Image.open(images / "00000002.png").getpixel((3, 3)) == (0, 0, 255)
    report = check_data(out, image_folder=images, decode=True)
    assert report.inspection.problems == [] and report.summary()["images"] == 2


# ---------------------------------------------------------------------------------------------
# ScienceQA

PROBLEMS = {
    "5": {
        "question": "Which of these states is farthest north?",
        "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"],
        "answer": 0,
        "hint": "",
        "image": "image.png",
        "task": "closed choice",
        "grade": "grade2",
        "subject": "social science",
        "topic": "geography",
        "category": "Geography",
        "skill": "Read a map: cardinal directions",
        "lecture": "Maps have four cardinal directions, or main directions. Those directions are north, south, east, "
        "and west.\nA compass rose is a set of arrows that point to the cardinal directions.",
        "solution": "To find the answer, look at the compass rose. West Virginia is farthest north.",
        "split": "train",
    },
    "6": {
        "question": "What does Tom have?",
        "choices": ["a cat", "a dog"],
        "answer": 1,
        "hint": "Tom has a dog.",
        "image": None,
        "subject": "language science",
        "grade": "grade1",
        "lecture": "",
        "solution": "",
        "split": "train",
    },
    "7": {
        "question": "Question: which  one?",
        "choices": ["x", "y", "z"],
        "answer": 2,
        "hint": "Look  closely.",
        "image": "image.png",
        "subject": "natural science",
        "grade": "grade7",
        "lecture": "First line.\\nSecond line.",
        "solution": "It is z.\nSee above.",
        "split": "train",
    },
}
SPLITS = {"train": ["5", "6", "7"], "val": [], "test": []}

PROMPTS = {
    "5": "Which of these states is farthest north?\nContext: N/A\n"
    "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma",
    "6": "What does Tom have?\nContext: Tom has a dog.\nOptions: (A) a cat (B) a dog",
    # LLaVA's `input.replace('Question: ', '')` removes it inside the question too; double spaces become single
    "7": "which one?\nContext: Look closely.\nOptions: (A) x (B) y (C) z",
}
ANSWERS = {
    "5": "Maps have four cardinal directions, or main directions. Those directions are north, south, east, and west.\n"
    "A compass rose is a set of arrows that point to the cardinal directions. To find the answer, look at the compass "
    "rose. West Virginia is farthest north. The answer is A.",
    "6": "The answer is B.",
    "7": "First line.\nSecond line. It is z.\nSee above. The answer is C.",
}


def test_scienceqa_prompt_and_answer_strings():
    for pid, problem in PROBLEMS.items():
        assert build_prompt(problem) == PROMPTS[pid]
        assert build_question(problem) == PROMPTS[pid]
        assert build_answer(problem) == build_answer(problem, "lecture-solution") == ANSWERS[pid]
        assert build_question(problem, "letter") == PROMPTS[pid] + "\n" + SINGLE_LETTER_PROMPT
        assert build_answer(problem, "letter") == "ABC"[int(pid) - 5]
    assert SINGLE_LETTER_PROMPT == "Answer with the option's letter from the given choices directly."
    assert to_record("6", PROBLEMS["6"]) == {
        "id": "6",
        "conversations": [{"from": "human", "value": PROMPTS["6"]}, {"from": "gpt", "value": ANSWERS["6"]}],
    }


@pytest.mark.parametrize("answer_format", ["lecture-solution", "letter"])
def test_scienceqa_conversion(tmp_path, answer_format):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps(SPLITS))
    for pid in ("5",):  # problem 7's image is missing
        (tmp_path / "images" / "train" / pid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "train" / pid / "image.png")
    out = tmp_path / "sqa_train.json"
    result = CliRunner().invoke(
        app,
        ["data", "convert", "scienceqa", "--problems", str(tmp_path / "problems.json"),
         "--splits", str(tmp_path / "pid_splits.json"), "--split", "train", "--image-root", str(tmp_path / "images"),
         "--out", str(out), "--answer-format", answer_format],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 ScienceQA train records (2 with an image)" in result.output
    assert f"data.image_folder): {tmp_path / 'images' / 'train'}" in result.output
    assert "1 image(s) not found" in result.output and "7/image.png" in result.output
    records = json.loads(out.read_text())
    letter = answer_format == "letter"
    suffix = "\n" + SINGLE_LETTER_PROMPT if letter else ""
    assert records[0] == {
        "id": "5",
        "image": "5/image.png",
        "conversations": [
            {"from": "human", "value": PROMPTS["5"] + suffix + "\n<image>"},
            {"from": "gpt", "value": "A" if letter else ANSWERS["5"]},
        ],
    }
    assert "image" not in records[1] and records[1]["conversations"][0]["value"] == PROMPTS["6"] + suffix
    assert [r["conversations"][1]["value"] for r in records] == (["A", "B", "C"] if letter else list(ANSWERS.values()))
    read, problems, _ = read_checked(out, tmp_path / "images" / "train")
    assert [(p.id, p.kind) for p in problems] == [("7", "image_missing")]


def test_scienceqa_needs_its_files(tmp_path):
    result = convert("scienceqa", "--out", tmp_path / "x.json")
    assert result.exit_code == 2 and "--problems" in result.output
