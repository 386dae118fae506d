"""`lvit generate`: question files, batched generation, resumable answer files.

The model is the tiny LLaVA after one step at a tiny learning rate: close to random, so its greedy
answers run to max_new_tokens or stop early depending on the question and image (varied lengths),
and its flat next-token distributions make batched-vs-single differences show up if there are any.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.errors import LvitError
from lvit.infer.answers import generate_file, read_answer_file
from lvit.infer.generation import GenerationSettings, iter_answers
from lvit.infer.load import load_model
from lvit.infer.questions import read_questions

MAX_NEW = 16


def _answers(model, encoder, loader, convs, images, batch_size=16, **settings) -> list[str]:
    """Every answer `iter_answers` gives, in order."""
    batches = iter_answers(model, encoder, loader, convs, images, GenerationSettings(**settings), batch_size)
    return [answer for _, answers in batches for answer in answers]


@pytest.fixture(scope="module")
def near_random_run(tiny_recipe, tmp_path_factory) -> Path:
    from lvit.train.run import run

    out = tmp_path_factory.mktemp("gen-run") / "run"
    return run(tiny_recipe("finetune", out_dir=out, training={"max_steps": 1, "learning_rate": 1e-5}))


@pytest.fixture(scope="module")
def questions_file(shapes_data, tmp_path_factory) -> Path:
    """Image questions with references, text-only ones, an unanswered one and multi-turn records."""
    test = json.loads(Path(shapes_data["test"]).read_text())
    instruct = json.loads(Path(shapes_data["instruct"]).read_text())
    records = [
        *test[:6],
        *[r for r in instruct if r["id"].startswith("txt-")][:2],
        {"id": "open", "conversations": [{"from": "human", "value": "What colours can a shape have here?"}]},
        {
            "id": "open-image",
            "image": test[0]["image"],
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}],
        },
        *[r for r in instruct if r["id"].startswith("ins-")][:3],
    ]
    path = tmp_path_factory.mktemp("questions") / "questions.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def loaded(near_random_run):
    return load_model(near_random_run, device="cpu")


def test_read_questions(questions_file):
    questions = {q.id: q for q in read_questions(questions_file)}
    assert questions["test-48-colour"].reference in {"red", "green", "blue", "yellow"}
    assert questions["test-48-colour"].prompt == "What colour is the shape?"
    assert questions["test-48-colour"].conversation.has_image
    assert questions["txt-0"].reference == "red, green, blue or yellow" and questions["txt-0"].image is None
    assert questions["open"].reference is None and questions["open"].conversation.turns == [
        ("user", "What colours can a shape have here?")
    ]
    assert questions["open-image"].reference is None and questions["open-image"].conversation.has_image
    multi = next(q for q in questions.values() if q.id.startswith("ins-"))
    # the last user turn is asked, the earlier turns are the history, the last answer the reference
    assert [role for role, _ in multi.conversation.turns] == ["user", "assistant", "user"]
    assert multi.reference is not None


def test_read_questions_chat_format(tmp_path):
    """Any format read_records reads; unanswered questions there too."""
    path = tmp_path / "q.jsonl"
    image_turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the shape?"}]}
    rows = [
        {"id": "a", "messages": [image_turn, {"role": "assistant", "content": "left"}], "images": ["00001.png"]},
        {"id": "b", "messages": [image_turn], "images": ["00002.png"]},
        {"id": "c", "messages": [{"role": "user", "content": "Hi?"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b, c = read_questions(path)
    assert (a.id, a.reference, a.image, a.prompt) == ("a", "left", "00001.png", "Where is the shape?")
    assert (b.id, b.reference, b.image, b.conversation.has_image) == ("b", None, "00002.png", True)
    assert (c.reference, c.image, c.conversation.turns) == (None, None, [("user", "Hi?")])


def test_read_questions_llava_question_format(tmp_path):
    """LLaVA's own question files (`model_vqa.py`'s input, LLaVA-Bench's questions.jsonl): one
    `{"question_id", "image", "text"}` per line; `lvit generate` answers them as it answers LLaVA records."""
    path = tmp_path / "llava_questions.jsonl"
    rows = [
        {"question_id": 0, "image": "00001.png", "text": "What colour is the shape?", "category": "conv"},
        {"question_id": 1, "text": "What colours can a shape have here?"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = read_questions(path)
    assert (a.id, a.image, a.prompt, a.reference, a.conversation.has_image) == (
        "0",
        "00001.png",
        "What colour is the shape?",
        None,
        True,
    )
    assert (b.id, b.image, b.prompt, b.conversation.has_image) == (
        "1",
        None,
        "What colours can a shape have here?",
        False,
    )
    llava = tmp_path / "as_llava.json"
    first = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}]
    rows = [
        {"id": "0", "image": "00001.png", "conversations": first},
        {"id": "1", "conversations": [{"from": "human", "value": "What colours can a shape have here?"}]},
    ]
    llava.write_text(json.dumps(rows))
    assert [(q.id, q.conversation, q.image) for q in read_questions(llava)] == [
        (q.id, q.conversation, q.image) for q in (a, b)
    ]


def test_read_questions_errors(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "x"}]}] * 2))
    with pytest.raises(LvitError, match="'a' appears more than once"):
        read_questions(path)
    path.write_text(json.dumps([{"id": "b", "conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(LvitError, match=r"(?s)1 record\(s\) cannot be used.*unknown role 'robot'"):
        read_questions(path)


def test_batched_equals_one_at_a_time(loaded, questions_file, shapes_data):
    questions = read_questions(questions_file)
    convs, images = [q.conversation for q in questions], [q.image for q in questions]
    args = (loaded.model, loaded.encoder(), loaded.image_loader(shapes_data["images"]), convs, images)
    single = _answers(*args, max_new_tokens=MAX_NEW, batch_size=1)
    for batch_size in (4, len(questions)):
        assert _answers(*args, max_new_tokens=MAX_NEW, batch_size=batch_size) == single
    lengths = {len(loaded.processor.tokenizer(a)["input_ids"]) for a in single}
    assert len(lengths) > 2, single  # the answers really differ in length (some stop early)
    assert not loaded.model.training


def test_generate_cli_writes_and_resumes(near_random_run, questions_file, shapes_data, tmp_path):
    out = tmp_path / "answers.jsonl"
    cmd = [
        "generate",
        str(near_random_run),
        "--data",
        str(questions_file),
        "--out",
        str(out),
        "--image-folder",
        str(shapes_data["images"]),
        "--batch-size",
        "4",
        "--max-new-tokens",
        str(MAX_NEW),
    ]
    result = CliRunner().invoke(app, cmd, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    questions = read_questions(questions_file)
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in first] == [q.id for q in questions]
    assert "reference" not in first[8] and first[0]["reference"] == questions[0].reference
    assert first[0]["image"] == questions[0].image and "image" not in first[6]
    assert (
        f"{len(questions)} answers in {out}" in result.output and "exact match against the references" in result.output
    )

    # Interrupt: keep 5 rows (one marked, to see it is not regenerated), then a cut-off line.
    kept = [dict(r) for r in first[:5]]
    kept[2]["answer"] = "KEPT"
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "test-50-place", "ans')
    result = CliRunner().invoke(app, cmd, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in again] == [q.id for q in questions]  # each id once, cut-off line replaced
    assert again[2]["answer"] == "KEPT"
    assert [r["answer"] for r in again[5:]] == [r["answer"] for r in first[5:]]  # same answers after the resume

    # Nothing left to do: no model call, file unchanged.
    before = out.read_bytes()
    assert CliRunner().invoke(app, cmd, catch_exceptions=False).exit_code == 0
    assert out.read_bytes() == before


def test_resume_refuses_answers_to_other_questions(loaded, questions_file, tmp_path):
    questions = read_questions(questions_file)[:2]
    out = tmp_path / "a.jsonl"
    out.write_text(json.dumps({"id": questions[0].id, "prompt": "something else", "answer": "x"}) + "\n")
    with pytest.raises(LvitError, match="for a different question"):
        generate_file(loaded, questions, out, settings=GenerationSettings(4), progress=False)


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "a.jsonl"
    out.write_text('{"id": "a", "answer": "x"}\nnot json\n{"id": "b", "answer": "y"}\n')
    with pytest.raises(LvitError, match=r"a\.jsonl:2: not a JSON answer row"):
        read_answer_file(out)


def test_missing_images_fail_before_loading(questions_file, tmp_path):
    result = CliRunner().invoke(
        app, ["generate", str(tmp_path / "no-model"), "--data", str(questions_file), "--out", str(tmp_path / "a.jsonl")]
    )
    assert result.exit_code == 2
    assert "question image(s) not found" in result.output and "--image-folder" in result.output


def test_unreadable_images_fail_before_loading(questions_file, shapes_data, tmp_path):
    """An image file that is not an image (a text file, an HTML error page saved as .png) is caught by its header."""
    images = tmp_path / "images"
    shutil.copytree(shapes_data["images"], images)
    records = json.loads(Path(questions_file).read_text())
    broken = next(r["image"] for r in records if r.get("image"))
    (images / broken).write_text("<html>404 not found</html>")
    args = ["generate", str(tmp_path / "no-model"), "--data", str(questions_file), "--out", str(tmp_path / "a.jsonl")]
    result = CliRunner().invoke(app, [*args, "--image-folder", str(images)])
    assert result.exit_code == 2 and "question image(s) cannot be read" in result.output, result.output
    assert "not an image file PIL can read" in result.output and not (tmp_path / "a.jsonl").exists()


def test_stock_llava_folder_answers_like_the_run(loaded, near_random_run, questions_file, shapes_data, tmp_path):
    """A folder without lvit_run.json loads with plain transformers, template vicuna_v1 unless it says otherwise."""
    folder = tmp_path / "stock"
    loaded.model.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    stock = load_model(folder, device="cpu")
    assert type(stock.model).__name__ == "LlavaForConditionalGeneration" and stock.template == "vicuna_v1"
    questions = read_questions(questions_file)
    convs, images = [q.conversation for q in questions], [q.image for q in questions]
    expected = _answers(
        loaded.model,
        loaded.encoder(),
        loaded.image_loader(shapes_data["images"]),
        convs,
        images,
        max_new_tokens=MAX_NEW,
    )
    got = _answers(
        stock.model, stock.encoder(), stock.image_loader(shapes_data["images"]), convs, images, max_new_tokens=MAX_NEW
    )
    assert got == expected

    (folder / "lvit_export.json").write_text(json.dumps({"recipe": {"data": {"template": "plain"}}}))
    assert load_model(folder, device="cpu").template == "plain"


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LvitError, match="neither an lvit run folder"):
        load_model(tmp_path / "empty")


def test_sampling_options(loaded, questions_file, shapes_data):
    questions = read_questions(questions_file)[:3]
    convs, images = [q.conversation for q in questions], [q.image for q in questions]
    loader = loaded.image_loader(shapes_data["images"])
    answers = _answers(
        loaded.model, loaded.encoder(), loader, convs, images, max_new_tokens=8, temperature=1.0, top_p=0.9
    )
    assert len(answers) == 3
    with pytest.raises(LvitError, match="--temperature"):
        GenerationSettings(temperature=-1).kwargs()


def test_checkpoint_folder_loads(tiny_recipe, tmp_path):
    """An intermediate checkpoint answers too (it carries the run files)."""
    from lvit.train.run import run

    out = run(
        tiny_recipe(
            "finetune", out_dir=tmp_path / "run", training={"max_steps": 2, "save_strategy": "steps", "save_steps": 1}
        )
    )
    checkpoint = out / "checkpoint-1"
    shutil.rmtree(out / "checkpoint-2", ignore_errors=True)
    model = load_model(checkpoint, device="cpu")
    assert model.template == "vicuna_v1" and not model.model.training


def test_ctrl_c_says_what_was_kept_and_a_rerun_resumes(
    near_random_run, questions_file, shapes_data, tmp_path, monkeypatch
):
    import lvit.infer.generation

    generate_batch = lvit.infer.generation.generate_batch
    calls = []

    def interrupted_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate_batch(*args, **kwargs)

    monkeypatch.setattr(lvit.infer.generation, "generate_batch", interrupted_second_batch)
    out = tmp_path / "answers.jsonl"
    cmd = ["generate", str(near_random_run), "--data", str(questions_file), "--out", str(out), "--image-folder",
           str(shapes_data["images"]), "--batch-size", "4", "--max-new-tokens", "4"]  # fmt: skip
    result = CliRunner().invoke(app, cmd, catch_exceptions=False)
    n = len(read_questions(questions_file))
    assert result.exit_code == 130, result.output
    assert (
        f"interrupted: {out} keeps 4 of {n} answers (4 from this run); run the same command again to answer the rest"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert len(read_answer_file(out)) == 4  # the first batch, flushed

    monkeypatch.setattr(lvit.infer.generation, "generate_batch", generate_batch)
    result = CliRunner().invoke(app, cmd, catch_exceptions=False)
    assert result.exit_code == 0 and f"{n} answers in {out}" in result.output
    assert len(read_answer_file(out)) == n
