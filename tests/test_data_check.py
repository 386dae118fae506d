"""`lvit data check`, and training on imperfect data (data.on_bad_record, skipped_records.jsonl)."""

from __future__ import annotations

import io
import json
import logging
import pickle

import numpy as np
import pytest
from conftest import save_llava_dataset
from PIL import Image
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.data.check import check_data
from lvit.data.collator import LlavaCollator
from lvit.data.dataset import Skipped, prepare, tidy_skipped
from lvit.data.images import ImageLoader
from lvit.data.normalise import normalise
from lvit.data.records import KINDS
from lvit.errors import LvitError
from lvit.recipe.schema import DataSection
from lvit.runs.files import SKIPPED_FILE
from lvit.templates.builtin import VICUNA_V1_SYSTEM
from lvit.templates.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, Conversation
from lvit.templates.encoder import ConversationEncoder


def qa(rid, *turns, image=None, system=None) -> dict:
    convs = [{"from": "system", "value": system}] if system else []
    for i, text in enumerate(turns):
        convs.append({"from": "human" if i % 2 == 0 else "gpt", "value": text})
    out = {"id": rid, "conversations": convs}
    if image:
        out["image"] = image
    return out


def write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / "good.png")
    Image.new("RGBA", (16, 12), (0, 0, 200, 128)).save(folder / "rgba.png")
    rng = np.random.RandomState(0)
    noisy = Image.fromarray((rng.rand(48, 48, 3) * 255).astype("uint8"))
    for fmt, name in (("PNG", "trunc.png"), ("JPEG", "trunc.jpg")):
        buf = io.BytesIO()
        noisy.save(buf, fmt)
        (folder / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.png").write_bytes(b"not a picture")
    Image.new("RGB", (80, 80)).save(folder / "bomb.png")  # with MAX_IMAGE_PIXELS = 3000: over twice the limit
    Image.new("RGB", (60, 60)).save(folder / "large.png")  # over the limit, under twice it: a warning


Q = "<image>\nWhat colour is the shape?"

RECORDS = [
    qa("ok-1", Q, "red", image="good.png"),
    qa("ok-text", "What colours can a shape have here?", "red or blue"),
    qa("missing-img", Q, "red", image="nope.png"),
    qa("trunc-png", Q, "red", image="trunc.png"),
    qa("trunc-jpg", Q, "red", image="trunc.jpg"),
    qa("not-image", Q, "red", image="notes.png"),
    qa("bomb", Q, "red", image="bomb.png"),
    qa("large", Q, "red", image="large.png"),
    qa("no-placeholder", "What colour is the shape?", "red", image="good.png"),
    qa("stray-placeholder", Q, "red"),
    {"id": "empty-conv", "conversations": []},
    {"id": "starts-gpt", "conversations": [{"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Q?"},
                                           {"from": "gpt", "value": "A."}]},
    {"id": "not-alt", "image": "good.png", "conversations": [{"from": "human", "value": Q},
                                                             {"from": "human", "value": "And?"},
                                                             {"from": "gpt", "value": "red"}]},
    {"id": "bad-role", "conversations": [{"from": "human", "value": "Q?"}, {"from": "bot", "value": "A."}]},
    qa("empty-turn", "Q?", ""),
    qa("non-string", "Q?", 42),
    qa("ok-1", Q, "blue", image="rgba.png"),  # a duplicate id
    {"id": "two-problems", "image": "gone.png", "conversations": [{"from": "human", "value": Q},
                                                                  {"from": "human", "value": "And?"}]},
    "just a string",
    {"id": "system-later", "conversations": [{"from": "human", "value": "Q?"}, {"from": "system", "value": "S"},
                                             {"from": "gpt", "value": "A."}]},
    qa("ends-human", "Q?", "A.", "Q2?"),
]  # fmt: skip

EXPECTED = [  # (index, id, kind, severity) without --decode: each image's header is read
    (2, "missing-img", "image_missing", "error"),
    (5, "not-image", "image_unreadable", "error"),
    (6, "bomb", "image_too_large", "error"),
    (7, "large", "image_too_large", "warning"),
    (8, "no-placeholder", "placeholder_mismatch", "error"),
    (9, "stray-placeholder", "placeholder_mismatch", "error"),
    (10, "empty-conv", "no_conversation", "error"),
    (11, "starts-gpt", "starts_with_assistant", "error"),
    (12, "not-alt", "not_alternating", "error"),
    (13, "bad-role", "unknown_role", "error"),
    (14, "empty-turn", "empty_turn", "error"),
    (15, "non-string", "empty_turn", "error"),
    (16, "ok-1", "duplicate_id", "warning"),
    (17, "two-problems", "not_alternating", "error"),
    (17, "two-problems", "image_missing", "error"),
    (18, None, "not_an_object", "error"),
    (19, "system-later", "system_not_first", "error"),
    (20, "ends-human", "ends_with_user", "error"),
]
DECODED = [  # what --decode adds: files cut off after an intact header
    (3, "trunc-png", "image_truncated", "error"),
    (4, "trunc-jpg", "image_truncated", "error"),
]


@pytest.fixture
def bad_data(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    write_images(tmp_path / "images")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path, tmp_path / "images"


def found(report):
    return [(p.index, p.id, p.kind, p.severity) for p in report.inspection.problems]


def test_every_problem_is_reported_with_the_record(bad_data):
    path, images = bad_data
    report = check_data(path, image_folder=images)
    assert found(report) == EXPECTED
    s = report.summary()
    assert (s["records"], s["images"], s["unique_images"], s["text_only"]) == (21, 8, 8, 1)
    assert (s["errors"], s["warnings"], s["trainable"], s["ok"]) == (16, 2, 6, False)
    assert s["problems_by_kind"]["image_missing"] == 2 and s["problems_by_kind"]["empty_turn"] == 2
    assert s["problems_by_kind"]["image_unreadable"] == 1 and s["problems_by_kind"]["image_too_large"] == 2
    # every kind found is a documented one, and the text report explains it
    assert set(s["problems_by_kind"]) <= set(KINDS)
    assert f"image_missing                2  {KINDS['image_missing']}" in report.format_text()
    assert s["lengths"] is None and s["overlong"] is None and s["decoded"] is False
    by_id = {p.id: p for p in report.inspection.problems}
    assert str(by_id["missing-img"]) == (
        f"record #2 (id 'missing-img'): image not found: {images / 'nope.png'} "
        "(check data.image_folder / --image-folder or the record's image path)"
    )
    assert "put exactly one at the start or end of the first human turn" in by_id["no-placeholder"].reason
    assert by_id["not-image"].reason == (
        f"image {images / 'notes.png'} is not an image file PIL can read (wrong file, or an unsupported format): "
        "replace it with a PNG or JPEG"
    )


def test_decode_finds_truncated_unreadable_and_too_large_images(bad_data):
    path, images = bad_data
    report = check_data(path, image_folder=images, decode=True)
    assert found(report) == sorted(EXPECTED + DECODED, key=lambda p: p[0])
    s = report.summary()
    assert (s["errors"], s["warnings"], s["trainable"], s["decoded"]) == (18, 2, 4, True)


def test_the_default_check_reads_each_header(tmp_path):
    """Without --decode: a file that is not an image is found whatever its name; a PNG cut off after its
    header only by the full decode."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.RandomState(1)
    (images / "random.png").write_bytes(rng.bytes(4096))
    (images / "page.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    buf = io.BytesIO()
    Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(buf, "PNG")
    (images / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("RGB", (8, 8)).save(images / "fine.jpg")
    records = [qa(name, Q, "red", image=name) for name in ("random.png", "page.jpg", "cut.png", "fine.jpg")]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))

    cheap = check_data(path, image_folder=images)
    assert found(cheap) == [
        (0, "random.png", "image_unreadable", "error"),
        (1, "page.jpg", "image_unreadable", "error"),
    ]
    assert "images were checked by their header only" in cheap.format_text()
    full = check_data(path, image_folder=images, decode=True)
    assert found(full) == [*found(cheap), (2, "cut.png", "image_truncated", "error")]


def test_the_default_check_reads_embedded_images(tmp_path):
    """An image embedded in a Hugging Face dataset is checked by its bytes, as a file is."""

    good = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(good, "PNG")
    rows = [
        {"id": rid, "image": {"bytes": data, "path": None},
         "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": "red"}]}
        for rid, data in (("good", good.getvalue()), ("garbage", b"\x00\x01 not an image at all"))
    ]  # fmt: skip
    save_llava_dataset(rows, tmp_path / "ds")
    report = check_data(tmp_path / "ds")
    assert found(report) == [(1, "garbage", "image_unreadable", "error")]
    (problem,) = report.inspection.problems
    assert "the image embedded in row 1 (column 'image') of" in problem.reason


def test_jsonl_problems_name_the_line(tmp_path):
    lines = [json.dumps(qa("a", "Q?", "A.")), "", '{"id": "broken", "conversations": [', json.dumps(qa("c", "Q?"))]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = check_data(path)
    problems = report.inspection.problems
    assert [(p.index, p.id, p.line, p.kind) for p in problems] == [
        (1, None, 3, "invalid_json"),
        (2, "c", 4, "ends_with_user"),
    ]
    assert str(problems[0]).startswith("record #1 (line 3): not valid JSON")
    assert str(problems[1]).startswith("record #2 (id 'c', line 4): the conversation must end")
    assert report.summary()["records"] == 3


def run_cli(*args):
    return CliRunner().invoke(app, ["data", "check", *map(str, args)])


def test_cli_exit_codes_text_and_json(bad_data, shapes_data):
    path, images = bad_data
    result = run_cli(path, "--image-folder", images)
    assert result.exit_code == 1
    out = result.output
    assert "record #12 (id 'not-alt'): turns must alternate human/gpt" in out and "[not_alternating]" in out
    assert "[duplicate_id, warning]" in out
    assert "records        21" in out and "16 error(s)" in out

    result = run_cli(path, "--image-folder", images, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert set(report) == {
        "path", "format", "recipe", "ok", "records", "trainable", "images", "unique_images", "text_only",
        "decoded", "errors", "warnings", "problems_by_kind", "lengths", "overlong", "problems",
    }  # fmt: skip
    assert report["format"] == "llava" and report["ok"] is False
    assert [(p["index"], p["id"], p["kind"], p["severity"]) for p in report["problems"]] == EXPECTED
    assert set(report["problems"][0]) == {"index", "id", "line", "kind", "severity", "message"}

    clean = run_cli(shapes_data["instruct"], "--image-folder", shapes_data["images"])
    assert clean.exit_code == 0 and "no errors" in clean.output

    missing = run_cli(path.parent / "nope.json")
    assert missing.exit_code == 2 and "data file not found" in missing.output


def test_warnings_alone_exit_zero(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([qa("same", "Q?", "A."), qa("same", "Q2?", "B.")]))
    result = run_cli(path, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["problems_by_kind"] == {"duplicate_id": 1}


# ---------------------------------------------------------------------------------------------
# measuring in tokens (--recipe)


def make_encoder(parts, template="vicuna_v1"):
    from transformers import CLIPVisionConfig

    from lvit.model.processor import load_tokenizer
    from lvit.model.towers import num_image_tokens

    tok = load_tokenizer(parts[1])
    n = num_image_tokens(CLIPVisionConfig.from_pretrained(parts[0]))
    return ConversationEncoder(template, tok, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), n)


CONVS = [
    Conversation([("user", "What colour is the shape?"), ("assistant", "red")], has_image=True),
    Conversation([("user", "What colours can a shape have here?"), ("assistant", "red or blue")]),
    Conversation([("user", "Q {with} braces"), ("assistant", "a}{b"), ("user", "Where?"), ("assistant", "left")], True),
    Conversation([("user", "Look."), ("assistant", "ok")], has_image=True, system="Answer in one word."),
    Conversation([("user", ""), ("assistant", "a red square on the left")], has_image=True),
    Conversation([("user", "naïve café — 東京?"), ("assistant", "\x00 odd \n text ")]),
]


@pytest.mark.parametrize("parts_fixture", ["tiny_parts", "tiny_parts_bytelevel"])
@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
def test_encoder_lengths_match_the_encoder_exactly(request, parts_fixture, template):
    encoder = make_encoder(request.getfixturevalue(parts_fixture), template)
    lengths = encoder.lengths(CONVS)  # what the checker measures every record with
    rejected = lengths.rejected
    for i, conv in enumerate(CONVS):
        if template == "plain" and len([r for r, _ in conv.turns if r == "assistant"]) != 1:
            assert "exactly one caption" in rejected[i]
            continue
        enc = encoder.encode(conv)
        got = (lengths.total[i], lengths.image_end[i], lengths.first_trained[i])
        assert got == (len(enc.input_ids), enc.image_end, enc.first_trained), (i, conv)
    assert template == "vicuna_v1" or set(rejected) == {2}


def test_lengths_match_the_encoder_when_the_tokenizer_was_left_truncating(tiny_parts):
    """`lengths` calls the Rust tokenizer directly only in its plain state; a truncating one is measured as
    `encode` measures it (through the wrapper, which resets the state)."""
    encoder = make_encoder(tiny_parts)
    before = encoder.lengths(CONVS)
    encoder.tokenizer(["What colour is the shape?", " red"], truncation=True, max_length=2)
    assert encoder.tokenizer._tokenizer.truncation is not None  # left in a truncating state
    after = encoder.lengths(CONVS)
    assert after == before
    assert after.total == [len(encoder.encode(conv).input_ids) for conv in CONVS]
    encoder.tokenizer(["x"])  # back to the plain state for the other tests


def overlong_records():
    return [
        qa("fits", Q, "red", image="good.png"),
        qa("long", Q, "red on the left " * 30, image="good.png"),
        qa("late-image", Q, "red", image="good.png", system=" ".join([VICUNA_V1_SYSTEM] * 4)),
        qa("text", "What colours can a shape have here?", "red or blue"),
    ]


@pytest.mark.parametrize("policy", ["truncate", "drop", "error"])
def test_recipe_measures_lengths_and_applies_the_overlong_policy(tmp_path, tiny_recipe, tiny_parts, policy):
    write_images(tmp_path / "images")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(overlong_records()))
    encoder = make_encoder(tiny_parts)
    encs = {r["id"]: encoder.encode(normalise(r, 0).conversation) for r in overlong_records()}
    max_length = len(encs["fits"].input_ids) + 4
    assert encs["late-image"].image_end > max_length and len(encs["long"].input_ids) > max_length
    recipe = tiny_recipe.write(
        tmp_path / "r.yaml", data={"path": str(data), "image_folder": str(tmp_path / "images"),
                                   "max_length": max_length, "overlong": policy}
    )  # fmt: skip
    result = run_cli("--recipe", recipe, "--json")  # DATA and --image-folder come from the recipe
    report = json.loads(result.output)
    lengths = sorted(len(e.input_ids) for e in encs.values())
    p50 = int(np.percentile(lengths, 50, method="nearest"))
    assert {k: report["lengths"][k] for k in ("min", "p50", "max")} == {
        "min": lengths[0],
        "p50": p50,
        "max": lengths[-1],
    }
    assert sum(b["count"] for b in report["lengths"]["histogram"]) == 4
    too_long = [(p["id"], p["severity"]) for p in report["problems"] if p["kind"] == "too_long"]
    if policy == "truncate":
        assert report["overlong"] == {"policy": "truncate", "max_length": max_length, "truncated": 1, "dropped": 1}
        assert too_long == [("long", "warning"), ("late-image", "warning")] and result.exit_code == 0
    elif policy == "drop":
        assert report["overlong"]["dropped"] == 2 and report["overlong"]["truncated"] == 0
        assert too_long == [("long", "warning"), ("late-image", "warning")] and result.exit_code == 0
    else:
        assert too_long == [("long", "error"), ("late-image", "error")] and result.exit_code == 1
    assert report["trainable"] == (3 if policy == "truncate" else 2 if policy == "drop" else 2)

    text = run_cli("--recipe", recipe).output
    assert "sequence length in tokens (text + image tokens), 4 samples:" in text
    assert f"min {lengths[0]}  p50 {p50}" in text


def test_template_rejections_are_reported_with_a_recipe(tmp_path, tiny_recipe):
    data = tmp_path / "captions.json"
    data.write_text(json.dumps([qa("cap", "Describe.", "a square"), qa("two", "Describe.", "a", "More?", "b")]))
    recipe = tiny_recipe.write(tmp_path / "r.yaml", "align", data={"path": str(data), "image_folder": None})
    report = json.loads(run_cli("--recipe", recipe, "--json").output)
    assert [(p["id"], p["kind"]) for p in report["problems"]] == [("two", "template")]


# ---------------------------------------------------------------------------------------------
# training on imperfect data


def test_error_mode_stops_with_the_checkers_report(bad_data, tiny_parts):
    path, images = bad_data
    with pytest.raises(LvitError) as info:
        prepare(DataSection(path=str(path), image_folder=str(images)), make_encoder(tiny_parts), "my.yaml")
    msg = str(info.value)
    assert msg.startswith(f"{path}: 15 of 21 records cannot be trained on (data.path in my.yaml):\n")
    assert "\n  record #12 (id 'not-alt'): turns must alternate human/gpt, but turns 1 and 2 are both 'user'" in msg
    assert (
        "Problems by kind: empty_turn 2, ends_with_user 1, image_missing 2, image_too_large 1, image_unreadable 1,"
        in msg
    )
    assert f"\n  record #5 (id 'not-image'): image {images / 'notes.png'} is not an image file PIL can read" in msg
    assert "duplicate_id" not in msg  # a warning does not stop training
    assert "data.on_bad_record: skip" in msg and f"lvit data check {path} --recipe my.yaml" in msg


def test_skip_mode_lists_every_skipped_record(bad_data, tiny_parts, tmp_path):
    path, images = bad_data
    data = DataSection(path=str(path), image_folder=str(images), on_bad_record="skip")
    prepared = prepare(data, make_encoder(tiny_parts))
    expected: dict = {}  # one line per record, named by its first problem
    for i, rid, kind, severity in EXPECTED:
        if severity == "error":
            expected.setdefault(i, (i, rid, kind))
    assert [(s.index, s.id, s.kind) for s in prepared.skipped] == list(expected.values())
    two = next(s for s in prepared.skipped if s.id == "two-problems")
    assert two.kind == "not_alternating" and "image not found" in two.reason  # both reasons kept
    assert prepared.dataset["id"] == ["ok-1", "ok-text", "trunc-png", "trunc-jpg", "large", "ok-1"]
    assert prepared.total == 21


def test_collator_skips_an_undecodable_image_and_records_it(tmp_path, tiny_parts, caplog):
    from transformers import AutoImageProcessor

    write_images(tmp_path / "images")
    encoder = make_encoder(tiny_parts)
    loader = ImageLoader(AutoImageProcessor.from_pretrained(tiny_parts[0]), tmp_path / "images")
    rows = [
        {"id": "ok", "index": 0, "image_path": "good.png", "roles": ["user", "assistant"], "texts": ["Q?", "red"],
         "system": None},
        {"id": "broken", "index": 1, "image_path": "trunc.png", "roles": ["user", "assistant"],
         "texts": ["Q?", "red"], "system": None},
    ]  # fmt: skip
    strict = LlavaCollator(encoder, loader, encoder.tokenizer.pad_token_id, 256)
    with pytest.raises(LvitError, match="record 'broken': cannot read image 'trunc.png'"):
        strict(rows)
    skipped = tmp_path / "run" / SKIPPED_FILE
    skipped.parent.mkdir()
    lenient = LlavaCollator(encoder, loader, encoder.tokenizer.pad_token_id, 256, skipped_file=skipped)
    with caplog.at_level(logging.WARNING, logger="lvit"):
        batch = lenient(rows)
        # the broken record stays as a stand-in that trains nothing: same batch size, labels all ignored
        assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
        assert (batch["labels"][1] == IGNORE_INDEX).all() and (batch["labels"][0] != IGNORE_INDEX).any()
        alone = lenient(rows[1:])  # a batch of one whose image fails: still a batch, with nothing to train
        assert alone["input_ids"].shape[0] == 1 and (alone["labels"] == IGNORE_INDEX).all()
        lenient(rows)  # met again (next epoch)
        pickle.loads(pickle.dumps(lenient))(rows)  # and again, by the copy in a fresh worker process
    warned = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("record 'broken' left out: cannot read image 'trunc.png'")
    assert len(skipped.read_text().splitlines()) == 1  # listed once
    assert tidy_skipped(skipped) == 1
    line = json.loads(skipped.read_text())
    assert (line["id"], line["index"], line["kind"]) == ("broken", 1, "image_unreadable")
    assert set(line) == set(Skipped.__dataclass_fields__) - {"source"}  # one source: no source named


def test_training_run_in_skip_mode_with_two_workers(tmp_path, tiny_recipe, shapes_data, caplog):
    from lvit.train.run import run

    images = tmp_path / "images"
    write_images(images)
    good = json.loads(shapes_data["instruct"].read_text())[:7]
    for r in good:
        r["image"] = str(shapes_data["images"] / r["image"]) if "image" in r else None
        if r["image"] is None:
            del r["image"]
    records = [
        *good,
        qa("corrupt", Q, "red", image="trunc.png"),  # exists: only decoding (in a worker) finds it
        qa("missing", Q, "red", image="nope.png"),
        {"id": "not-alt", "conversations": [{"from": "human", "value": "Q?"}, {"from": "human", "value": "Q?"}]},
        qa("too-long", Q, "red " * 300, image="good.png"),
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    recipe = tiny_recipe(
        out_dir=out,
        data={"path": str(data), "image_folder": str(images), "on_bad_record": "skip", "overlong": "drop"},
        training={"dataloader_num_workers": 2, "max_steps": 3, "per_device_train_batch_size": 4},
        global_batch_size=...,
    )
    with caplog.at_level(logging.INFO, logger="lvit"):
        run(recipe)
    lines = [json.loads(line) for line in (out / SKIPPED_FILE).read_text().splitlines()]
    assert [(d["id"], d["index"], d["kind"]) for d in lines] == [
        ("missing", 8, "image_missing"),
        ("not-alt", 9, "not_alternating"),
        ("too-long", 10, "too_long"),
        ("corrupt", 7, "image_unreadable"),  # found by the collator mid-run, in a worker
    ]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lvit")]
    assert any("3 of 11 record(s) left out of training (2 invalid" in m for m in messages)
    assert any("4 of 11 record(s) were left out of training" in m for m in messages)
    # the run's summary counts what the file lists, the record found mid-run included
    assert json.loads((out / "lvit_run.json").read_text())["skipped_records"] == 4
