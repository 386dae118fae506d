"""Preparing the training dataset (validation, overlong policies) and collating batches."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from lvit.data.collator import LlavaCollator
from lvit.data.dataset import prepare, write_skipped
from lvit.data.images import ImageLoader
from lvit.data.normalise import normalise
from lvit.data.records import conversation_from_row
from lvit.errors import LvitError
from lvit.model.processor import load_tokenizer
from lvit.model.towers import num_image_tokens
from lvit.recipe.schema import DataSection
from lvit.templates.builtin import VICUNA_V1_SYSTEM
from lvit.templates.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER
from lvit.templates.encoder import ConversationEncoder


@pytest.fixture(scope="module")
def tok(tiny_parts):
    return load_tokenizer(tiny_parts[1])


@pytest.fixture(scope="module")
def n_img(tiny_parts):
    from transformers import CLIPVisionConfig

    return num_image_tokens(CLIPVisionConfig.from_pretrained(tiny_parts[0]))


@pytest.fixture(scope="module")
def encoder(tok, n_img):
    return ConversationEncoder("vicuna_v1", tok, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), n_img)


@pytest.fixture(scope="module")
def plain_encoder(tok, n_img):
    return ConversationEncoder("plain", tok, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), n_img)


@pytest.fixture(scope="module")
def image_loader(tiny_parts, shapes_data):
    from transformers import AutoImageProcessor

    return ImageLoader(AutoImageProcessor.from_pretrained(tiny_parts[0]), shapes_data["images"])


@pytest.fixture(scope="module")
def collator_for(encoder, image_loader, tok):
    def make(max_length: int) -> LlavaCollator:
        return LlavaCollator(encoder, image_loader, tok.pad_token_id, max_length)

    return make


def data_section(path, shapes_data, **kw) -> DataSection:
    return DataSection(path=str(path), image_folder=str(shapes_data["images"]), **kw)


def write_records(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def qa_record(rid, *qa, image="00001.png", system=None):
    convs = [{"from": "system", "value": system}] if system else []
    for i, text in enumerate(qa):
        value = f"<image>\n{text}" if i == 0 and image else text
        convs.append({"from": "human" if i % 2 == 0 else "gpt", "value": value})
    out = {"id": rid, "conversations": convs}
    if image:
        out["image"] = image
    return out


def encode_raw(encoder, raw):
    return encoder.encode(normalise(raw, 0).conversation)


# ---------------------------------------------------------------------------------------------
# validation


def test_invalid_records_are_all_listed_by_id(tmp_path, shapes_data, encoder):
    records = [
        qa_record("good-1", "What colour is the shape?", "red"),
        {"id": "bad-no-conv", "image": "00001.png"},
        qa_record("bad-placeholder", "What colour is the shape?", "red", image=None)
        | {"conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "red"}]},
        qa_record("bad-missing-image", "What colour is the shape?", "red", image="nope.png"),
        qa_record("good-2", "What colours can a shape have here?", "red", image=None),
        qa_record("bad-ends-human", "What colour is the shape?", "red", "Where is the shape?"),
    ]
    path = write_records(tmp_path, records)
    with pytest.raises(LvitError) as info:
        prepare(data_section(path, shapes_data), encoder, source="my_recipe.yaml")
    msg = str(info.value)
    assert f"{path}: 4 of 6 records cannot be trained on (data.path in my_recipe.yaml)" in msg
    for index, rid in [(1, "bad-no-conv"), (2, "bad-placeholder"), (3, "bad-missing-image"), (5, "bad-ends-human")]:
        assert f"record #{index} (id {rid!r}): " in msg
    assert "good-1" not in msg and "good-2" not in msg


def test_missing_image_names_the_file(tmp_path, shapes_data, encoder):
    path = write_records(tmp_path, [qa_record("r", "What colour is the shape?", "red", image="sub/nope.png")])
    with pytest.raises(LvitError) as info:
        prepare(data_section(path, shapes_data), encoder)
    expected = shapes_data["images"] / "sub" / "nope.png"
    assert f"record #0 (id 'r'): image not found: {expected}" in str(info.value)


def test_absolute_image_path_ignores_image_folder(tmp_path, shapes_data, encoder):
    image = shapes_data["images"] / "00002.png"
    path = write_records(tmp_path, [qa_record("abs", "What colour is the shape?", "red", image=str(image))])
    prepared = prepare(DataSection(path=str(path), image_folder=str(tmp_path)), encoder)
    dataset, dropped = prepared.dataset, prepared.dropped
    assert dataset["image_path"] == [str(image)] and dropped == []


# Regression: template errors (here: a 'plain' record with two captions) name the record id like every other
# invalid record (they used to say only "record #1").
def test_plain_template_rejects_two_captions(tmp_path, shapes_data, plain_encoder):
    records = [
        qa_record("cap-ok", "Describe the image briefly.", "a red square"),
        qa_record("cap-two", "Describe the image briefly.", "a red square", "Where is it?", "left"),
    ]
    path = write_records(tmp_path, records)
    with pytest.raises(
        LvitError, match=r"1 of 2 records.*\n  record #1 \(id 'cap-two'\): the 'plain' template takes exactly one"
    ):
        prepare(data_section(path, shapes_data, template="plain"), plain_encoder)


def test_empty_data_file(tmp_path, shapes_data, encoder):
    path = write_records(tmp_path, [])
    with pytest.raises(LvitError, match="holds no record"):
        prepare(data_section(path, shapes_data), encoder)


# ---------------------------------------------------------------------------------------------
# overlong records

Q_COLOUR, Q_PLACE = "What colour is the shape?", "Where is the shape?"


@pytest.fixture
def overlong_case(tmp_path, shapes_data, encoder):
    """Five records and a max_length chosen from their encodings so that each hits one rule.

    - `fits`: short image record, fits;            - `text`: short text-only record, fits;
    - `long`: image fits, the answer starts inside max_length, the rest is cut (truncate keeps it);
    - `long-question`: the image fits but no answer token does (its first one is exactly at max_length);
    - `late-image`: a long system prompt pushes the image past max_length.
    """
    records = [
        qa_record("fits", Q_COLOUR, "red"),
        qa_record("long", Q_COLOUR, "red on the left", Q_PLACE, "on the left", Q_COLOUR, "red", Q_PLACE, "left"),
        qa_record("long-question", " ".join([Q_COLOUR] * 4), "red"),
        qa_record("text", "What colours can a shape have here?", "red", image=None),
        qa_record("late-image", Q_COLOUR, "red", system=" ".join([VICUNA_V1_SYSTEM] * 3)),
    ]
    enc = {r["id"]: encode_raw(encoder, r) for r in records}
    # At the boundary: `long-question`'s first answer token would sit exactly at index max_length.
    max_length = enc["long-question"].first_trained
    # The set-up this test relies on, checked rather than assumed:
    assert len(enc["fits"].input_ids) <= max_length and len(enc["text"].input_ids) <= max_length
    assert enc["long"].image_end <= enc["long"].first_trained < max_length < len(enc["long"].input_ids)
    assert enc["long-question"].image_end <= max_length <= enc["long-question"].first_trained
    assert enc["late-image"].image_end > max_length
    return write_records(tmp_path, records), enc, max_length


def test_truncate_keeps_what_can_be_cut_after_the_image(overlong_case, shapes_data, encoder, collator_for, n_img):
    path, enc, max_length = overlong_case
    prepared = prepare(data_section(path, shapes_data, max_length=max_length), encoder)
    dataset, dropped = prepared.dataset, prepared.dropped
    assert dataset["id"] == ["fits", "long", "text"]
    assert dataset["length"] == [len(enc["fits"].input_ids), max_length, len(enc["text"].input_ids)]
    assert [(d.id, d.index) for d in dropped] == [("long-question", 2), ("late-image", 4)]
    assert f"no answer token would remain within data.max_length {max_length}" in dropped[0].reason
    assert f"its image ends at token {enc['late-image'].image_end} > data.max_length {max_length}" in dropped[1].reason

    row = dataset[1]
    batch = collator_for(max_length)([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert len(ids) == max_length
    assert ids == enc["long"].input_ids[:max_length]  # only text after the image is cut
    assert ids.count(encoder.image_token_id) == n_img
    assert labels == enc["long"].labels[:max_length]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    assert labels[enc["long"].first_trained] != IGNORE_INDEX  # the answer starts inside max_length
    assert batch["attention_mask"].tolist() == [[1] * max_length]
    assert batch["pixel_values"].shape[0] == 1


def test_drop_drops_every_overlong_record(overlong_case, shapes_data, encoder):
    path, enc, max_length = overlong_case
    prepared = prepare(data_section(path, shapes_data, max_length=max_length, overlong="drop"), encoder)
    dataset, dropped = prepared.dataset, prepared.dropped
    assert dataset["id"] == ["fits", "text"]
    assert [(d.id, d.index) for d in dropped] == [("long", 1), ("long-question", 2), ("late-image", 4)]
    for d in dropped:
        assert d.reason == f"{len(enc[d.id].input_ids)} tokens (image tokens included) > data.max_length {max_length}"


def test_error_policy_names_every_overlong_record(overlong_case, shapes_data, encoder):
    path, _, max_length = overlong_case
    with pytest.raises(LvitError) as info:
        prepare(data_section(path, shapes_data, max_length=max_length, overlong="error"), encoder, "r.yaml")
    msg = str(info.value)
    assert f"3 records exceed data.max_length={max_length} and data.overlong is 'error' (in r.yaml)" in msg
    for index, rid in [(1, "long"), (2, "long-question"), (4, "late-image")]:
        assert f"record #{index} (id {rid!r}): " in msg
    assert "'fits'" not in msg and "'text'" not in msg


@pytest.mark.parametrize("policy", ["truncate", "drop", "error"])
def test_sample_of_exactly_max_length_is_not_overlong(tmp_path, shapes_data, encoder, policy):
    records = [qa_record("exact", Q_COLOUR, "red"), qa_record("one-more", Q_COLOUR, "red", "Where?", "left")]
    path = write_records(tmp_path, records)
    n = len(encode_raw(encoder, records[0]).input_ids)
    assert len(encode_raw(encoder, records[1]).input_ids) > n
    data = data_section(path, shapes_data, max_length=n, overlong=policy)
    if policy == "error":
        with pytest.raises(LvitError, match=r"1 records exceed .*\n  record #1 \(id 'one-more'\)"):
            prepare(data, encoder)
        return
    prepared = prepare(data, encoder)
    dataset, dropped = prepared.dataset, prepared.dropped
    assert dataset["id"][0] == "exact" and dataset["length"][0] == n
    assert [d.id for d in dropped] == ([] if policy == "truncate" else ["one-more"])


def test_every_record_dropped_is_an_error(overlong_case, shapes_data, encoder):
    path, enc, _ = overlong_case
    lengths = [len(e.input_ids) for e in enc.values()]
    too_small = min(lengths) - 1
    with pytest.raises(LvitError) as info:
        prepare(data_section(path, shapes_data, max_length=too_small, overlong="drop"), encoder)
    assert (
        f"every trainable record is too long for data.max_length {too_small}; the shortest needs data.max_length >= "
        f"{min(lengths)}, every record fits in {max(lengths)}"
    ) in str(info.value)


def test_write_skipped_writes_one_json_line_per_record(overlong_case, shapes_data, encoder, tmp_path):
    path, _, max_length = overlong_case
    dropped = prepare(data_section(path, shapes_data, max_length=max_length, overlong="drop"), encoder).skipped
    out = tmp_path / "run" / "skipped_records.jsonl"  # the folder does not exist yet
    write_skipped(dropped, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(dropped) == 3
    expected = [{k: v for k, v in asdict(d).items() if k != "source"} for d in dropped]
    assert [json.loads(line) for line in lines] == expected
    assert set(json.loads(lines[0])) == {"id", "index", "kind", "reason"}  # one source: none named


# ---------------------------------------------------------------------------------------------
# the collator


@pytest.fixture(scope="module")
def instruct(shapes_data, encoder):
    prepared = prepare(data_section(shapes_data["instruct"], shapes_data, max_length=256), encoder)
    assert prepared.dropped == []
    return prepared.dataset


def _check_padded(batch, rows, encoder, pad_id):
    width = batch["input_ids"].shape[1]
    for i, row in enumerate(rows):
        enc = encoder.encode(conversation_from_row(row))
        n = len(enc.input_ids)
        assert row["length"] == n
        assert batch["input_ids"][i].tolist() == enc.input_ids + [pad_id] * (width - n)
        assert batch["labels"][i].tolist() == enc.labels + [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)


def test_mixed_batch_pads_and_has_one_image_row_per_image_record(instruct, encoder, collator_for, image_loader, tok):
    image_rows = [r for r in instruct if r["image_path"] is not None][:2]
    text_rows = [r for r in instruct if r["image_path"] is None][:2]
    rows = [image_rows[0], text_rows[0], image_rows[1], text_rows[1]]
    batch = collator_for(256)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] == max(r["length"] for r in rows)
    assert min(r["length"] for r in rows) < batch["input_ids"].shape[1]  # some rows are padded
    _check_padded(batch, rows, encoder, tok.pad_token_id)
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id, encoder.image_token_id)
    expected = image_loader.pixel_values([image_loader.load(r["image_path"]) for r in image_rows])
    assert batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["pixel_values"], expected)
    image_tokens = (batch["input_ids"] == encoder.image_token_id).sum(dim=1).tolist()
    assert image_tokens == [encoder.num_image_tokens, 0, encoder.num_image_tokens, 0]


def test_text_only_batch_has_no_pixel_values(instruct, encoder, collator_for, tok):
    rows = [r for r in instruct if r["image_path"] is None][:3]
    batch = collator_for(256)(rows)
    assert "pixel_values" not in batch
    _check_padded(batch, rows, encoder, tok.pad_token_id)


def test_unreadable_image_names_the_record(tmp_path, encoder, tok, image_loader):
    import io

    from PIL import Image

    not_png = tmp_path / "not.png"
    not_png.write_bytes(b"not a png")
    path = write_records(tmp_path, [qa_record("not-img", Q_COLOUR, "red", image=str(not_png))])
    with pytest.raises(LvitError, match=rf"record #0 \(id 'not-img'\): image {not_png} is not an image file"):
        prepare(DataSection(path=str(path)), encoder)  # its header is read up front

    broken = tmp_path / "broken.png"
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buf, "PNG")
    broken.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    path = write_records(tmp_path, [qa_record("broken-img", Q_COLOUR, "red", image=str(broken))])
    dataset = prepare(DataSection(path=str(path)), encoder).dataset  # cut off after its header: found by decoding
    with pytest.raises(LvitError, match=rf"record 'broken-img': cannot read image '{broken}'"):
        LlavaCollator(encoder, image_loader, tok.pad_token_id, 256)(list(dataset))
