"""Reading LLaVA-format records and normalising them into conversations."""

from __future__ import annotations

import json

import pytest

from lvit.data.normalise import normalise
from lvit.data.reader import read_records
from lvit.data.records import RecordError
from lvit.data.sources import read_json_rows
from lvit.errors import LvitError
from lvit.templates.conversation import IMAGE_PLACEHOLDER


def rec(*turns, image: str | None = "a.png", rid: str = "r1") -> dict:
    """A raw record; `turns` alternate human/gpt values unless given as (from, value) pairs."""
    convs = []
    for i, turn in enumerate(turns):
        src, value = turn if isinstance(turn, tuple) else ("human" if i % 2 == 0 else "gpt", turn)
        convs.append({"from": src, "value": value})
    out = {"id": rid, "conversations": convs}
    if image is not None:
        out["image"] = image
    return out


@pytest.mark.parametrize(
    "first",
    [
        "<image>\nWhat colour is it?",
        "What colour is it?\n<image>",
        "  <image>What colour is it?  ",
        "What colour is it?<image>",
    ],
)
def test_placeholder_at_start_or_end_is_removed(first):
    record = normalise(rec(first, "red", "Where?", "left"), 3)
    conv = record.conversation
    assert conv.turns == [
        ("user", "What colour is it?"),
        ("assistant", "red"),
        ("user", "Where?"),
        ("assistant", "left"),
    ]
    assert conv.has_image is True
    assert conv.system is None
    assert (record.id, record.index, record.image) == ("r1", 3, "a.png")
    assert all(IMAGE_PLACEHOLDER not in text for _, text in conv.turns)


def test_text_only_record():
    record = normalise(rec("What colours can a shape have?", "red or blue", image=None), 0)
    assert record.image is None
    assert record.conversation.has_image is False
    assert record.conversation.turns == [("user", "What colours can a shape have?"), ("assistant", "red or blue")]


def test_roles_user_and_assistant_are_accepted_too():
    record = normalise(rec(("user", "<image>\nQ?"), ("assistant", "A.")), 0)
    assert record.conversation.turns == [("user", "Q?"), ("assistant", "A.")]


def test_system_turn_first_is_accepted():
    record = normalise(rec(("system", "Answer in one word."), ("human", "<image>\nColour?"), ("gpt", "red")), 0)
    assert record.conversation.system == "Answer in one word."
    assert record.conversation.turns == [("user", "Colour?"), ("assistant", "red")]
    assert record.to_row() == {
        "id": "r1",
        "image_path": "a.png",
        "image_paths": ["a.png"],
        "roles": ["user", "assistant"],
        "texts": ["Colour?", "red"],
        "system": "Answer in one word.",
    }


def test_missing_id_uses_the_index():
    raw = rec("Q?", "A.", image=None)
    del raw["id"]
    assert normalise(raw, 7).id == "7"


BAD = {
    "missing conversations": ({"id": "bad", "image": "a.png"}, "'conversations' is missing or empty"),
    "empty conversations": ({"id": "bad", "conversations": []}, "'conversations' is missing or empty"),
    "conversations not a list": ({"id": "bad", "conversations": "hi"}, "'conversations' is missing or empty"),
    "unknown role": (rec(("human", "<image>\nQ?"), ("bot", "A."), rid="bad"), "turn 2 has unknown role 'bot'"),
    "missing role": (
        {"id": "bad", "image": "a.png", "conversations": [{"value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]},
        "turn 1 has unknown role None",
    ),
    "empty value": (rec("<image>\nQ?", "   ", rid="bad"), "turn 2 ('gpt') has an empty or non-string 'value'"),
    "non-string value": (rec("<image>\nQ?", 42, rid="bad"), "turn 2 ('gpt') has an empty or non-string 'value'"),
    "turn not an object": (
        {"id": "bad", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, "A."]},
        "turn 2 is not an object",
    ),
    "starts with gpt": (
        rec(("gpt", "Hello."), ("human", "Q?"), ("gpt", "A."), image=None, rid="bad"),
        "must start with a human turn, but turn 1 is 'gpt' (the assistant)",
    ),
    # the image placeholder in a first gpt turn: the reason is the order, not the placeholder
    "starts with gpt holding the image": (
        rec(("gpt", "<image>\nHello."), ("human", "Q?"), ("gpt", "A."), rid="bad"),
        "must start with a human turn, but turn 1 is 'gpt' (the assistant)",
    ),
    "starts with gpt after a system turn": (
        rec(("system", "Be brief."), ("gpt", "Hello."), ("human", "<image>\nQ?"), ("gpt", "A."), rid="bad"),
        "must start with a human turn, but turn 2 is 'gpt' (the assistant)",
    ),
    "not alternating": (
        rec(("human", "<image>\nQ?"), ("human", "More?"), ("gpt", "A."), rid="bad"),
        "turns 1 and 2 are both 'user'",
    ),
    "ends with human": (rec("<image>\nQ?", "A.", "Q2?", rid="bad"), "must end with a gpt (assistant) turn"),
    "placeholder without image": (rec("<image>\nQ?", "A.", image=None, rid="bad"), "the record has no 'image'"),
    "image without placeholder": (rec("Q?", "A.", rid="bad"), "has an image but 0 '<image>' placeholders"),
    "two placeholders": (rec("<image>\n<image>\nQ?", "A.", rid="bad"), "has an image but 2 '<image>' placeholders"),
    "placeholder in a later human turn": (
        rec("<image>\nQ?", "A.", "<image>\nQ2?", "B.", rid="bad"),
        "turn 3: '<image>' may only appear in the first human turn",
    ),
    "placeholder in a gpt turn": (
        rec("<image>\nQ?", "A <image>", rid="bad"),
        "turn 2: '<image>' may only appear in the first human turn",
    ),
    "system turn later": (
        rec(("human", "<image>\nQ?"), ("system", "Be brief."), ("gpt", "A."), rid="bad"),
        "turn 2: a system turn may only come first",
    ),
    "image not a string": ({**rec("<image>\nQ?", "A.", rid="bad"), "image": 5}, "'image' must be a file path"),
    "image empty": ({**rec("<image>\nQ?", "A.", rid="bad"), "image": " "}, "'image' must be a file path"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_records_raise_record_error_naming_the_record(case):
    raw, reason = BAD[case]
    with pytest.raises(RecordError) as info:
        normalise(raw, 5)
    err = info.value
    assert err.where == "record #5 (id 'bad')"
    assert reason in err.reason
    assert str(err).startswith("record #5 (id 'bad'): ")
    assert isinstance(err, ValueError)


def test_record_that_is_not_an_object():
    with pytest.raises(RecordError, match=r"record #2: a record is a JSON object, got list"):
        normalise(["human", "gpt"], 2)


# Regression (was an lvit bug): a non-hashable "from" value (e.g. a list) made `ROLES.get(...)` raise TypeError,
# a traceback instead of a RecordError naming the record.
def test_unhashable_role_is_a_record_error():
    raw = {"id": "bad", "image": "a.png", "conversations": [{"from": ["human"], "value": "<image>\nQ?"}]}
    with pytest.raises(RecordError, match=r"record #0 \(id 'bad'\): turn 1 has unknown role \['human'\]"):
        normalise(raw, 0)


# Regression (was an lvit bug): '<image>' inside a system turn was neither counted nor rejected; the tokenizer
# turned it into an image-token id ("Image features and image tokens do not match" at training time).
def test_placeholder_in_system_turn_is_rejected():
    raw = rec(("system", "Look at <image> carefully."), ("human", "<image>\nQ?"), ("gpt", "A."), rid="bad")
    with pytest.raises(RecordError, match="'<image>' may only appear in the first human turn"):
        normalise(raw, 0)


# ---------------------------------------------------------------------------------------------
# reading files: read_json_rows (the raw rows), read_records

RECORDS = [rec("<image>\nQ?", "A.", rid="one"), rec("Q?", "A.", image=None, rid="two")]


def test_reads_a_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("\n  " + json.dumps(RECORDS, indent=2))  # leading whitespace is fine
    assert read_json_rows(path)[0] == RECORDS


def test_reads_json_lines_skipping_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    raws, lines, broken = read_json_rows(path)
    assert raws == RECORDS and lines == [1, 3] and broken == []


def test_invalid_json_lines_line_reports_its_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"id": "broken", "conversations": [\n' + json.dumps(RECORDS[1]))
    records, problems, total = read_records(path)  # a broken line is a problem, the rest still reads
    assert [r.id for r in records] == ["one", "two"] and total == 3
    assert [(p.index, p.line, p.kind) for p in problems] == [(1, 3, "invalid_json")]
    assert str(problems[0]).startswith("record #1 (line 3): not valid JSON")


def test_invalid_json_list_reports_line_and_column(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n {"id": "a",\n  "conversations": [}\n]')
    with pytest.raises(LvitError, match=rf"{path}: not valid JSON \(line 3, column \d+\)"):
        read_records(path)


def test_missing_data_file(tmp_path):
    with pytest.raises(LvitError, match="data file not found: .*nope.json"):
        read_records(tmp_path / "nope.json")


def test_shapes_data_reads_and_normalises(shapes_data):
    """The synthetic captions put the placeholder at the END of the human turn; instruct at the start."""
    captions = [normalise(r, i) for i, r in enumerate(read_json_rows(shapes_data["captions"])[0])]
    assert len(captions) == 48
    assert all(c.conversation.turns[0] == ("user", "Give a brief description of the image.") for c in captions)
    instruct = [normalise(r, i) for i, r in enumerate(read_json_rows(shapes_data["instruct"])[0])]
    text_only = [r for r in instruct if r.image is None]
    assert [r.id for r in text_only] == [f"txt-{i}" for i in range(48) if i % 10 == 0]  # synthetic: every 10th
    assert all(len(r.conversation.turns) == 4 and r.conversation.has_image for r in instruct if r.image)


def test_read_records_keeps_valid_records_and_reports_the_rest(tmp_path):
    raws = [RECORDS[0], rec("<image>\nQ?", "A.", image=None, rid="bad"), RECORDS[1]]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(raws))
    records, problems, total = read_records(path)
    assert total == 3
    assert [(r.id, r.index) for r in records] == [("one", 0), ("two", 2)]
    assert [p.where for p in problems] == ["record #1 (id 'bad')"]
    assert "the record has no 'image'" in problems[0].reason


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_question_files_may_end_with_a_user_turn(tmp_path, suffix):
    """`require_answer=False` reads questions (a last user turn) as they are; every other check still holds."""
    chat = {"id": "c", "messages": [{"role": "user", "content": "Q?"}]}
    raws = [
        rec("<image>\nQ?", rid="q"),  # a question: no answer
        rec("<image>\nQ?", "A.", "Q2?", rid="follow-up"),  # a follow-up question after an answer
        rec("<image>\nQ?", "A.", rid="answered"),
        rec("<image>\nQ?", image=None, rid="bad"),  # still invalid: a placeholder without an image
    ]
    path = tmp_path / f"questions{suffix}"
    path.write_text(json.dumps(raws) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in raws))
    records, problems, total = read_records(path, require_answer=False)
    assert total == 4
    assert [(r.id, r.conversation.turns[-1]) for r in records] == [
        ("q", ("user", "Q?")),
        ("follow-up", ("user", "Q2?")),
        ("answered", ("assistant", "A.")),
    ]
    assert [(p.id, p.kind) for p in problems] == [("bad", "placeholder_mismatch")]
    _, problems, _ = read_records(path)  # training data must end with an answer (checked before the placeholders)
    assert [(p.id, p.kind) for p in problems] == [(rid, "ends_with_user") for rid in ("q", "follow-up", "bad")]
    chat_path = tmp_path / "chat.json"
    chat_path.write_text(json.dumps([chat]))
    records, problems, _ = read_records(chat_path, require_answer=False)
    assert problems == [] and records[0].conversation.turns == [("user", "Q?")]
    assert [p.kind for p in read_records(chat_path)[1]] == ["ends_with_user"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_first_records_reads_no_further_than_the_rows_it_returns(tmp_path, suffix):
    """Export's self-check looks at a run's first records only: `first_records` stops there. What follows them is
    never parsed, so a broken tail (which `read_records` refuses, for a JSON list) does not matter."""
    from lvit.data.reader import first_records

    rows = [rec(f"<image>\nQuestion {i}?", f"Answer {i}.", rid=f"r{i}") for i in range(6)]
    rows[1] = {"id": "bad", "conversations": []}  # invalid: left out, still counted as a row read
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + ",\n{ this is not JSON")
        with pytest.raises(LvitError, match="not valid JSON"):
            read_records(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{ this is not JSON\n")
    assert [r.id for r in first_records(path, limit=4)] == ["r0", "r2", "r3"]
    assert [r.id for r in first_records(path, limit=100)] == ["r0", "r2", "r3", "r4", "r5"]
    assert first_records(path, limit=2)[0].conversation.turns[1] == ("assistant", "Answer 0.")
