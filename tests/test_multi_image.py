"""Several images per record: reading, checking, encoding, batching, training and generation.

A record with N images has N `<image>` placeholders in its user turns (LLaVA JSON `"image": [..]`, or chat
`"images": [..]` with one image part each); each image's tokens go where its placeholder is, and a batch's
`pixel_values` stacks the images in the order their tokens come.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import trained_runs

from lvit.data.check import inspect_data
from lvit.data.normalise import normalise, normalise_chat
from lvit.data.records import RecordError
from lvit.export.selfcheck import synthetic_image
from lvit.model.processor import build_processor, load_tokenizer
from lvit.model.towers import num_image_tokens
from lvit.templates.builtin import PLAIN_CHAT_TEMPLATE
from lvit.templates.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, Conversation, chat_messages
from lvit.templates.encoder import ConversationEncoder

BEFORE_AFTER = {
    "id": "pair-0",
    "image": ["a.png", "b.png"],
    "conversations": [
        {"from": "human", "value": "Before: <image>\nAfter: <image> What changed?"},
        {"from": "gpt", "value": "the colour"},
        {"from": "human", "value": "And this one? <image>"},
        {"from": "gpt", "value": "nothing"},
    ],
}


def _three_images() -> dict:
    return {**copy.deepcopy(BEFORE_AFTER), "image": ["a.png", "b.png", "c.png"]}


def test_llava_record_with_several_images_keeps_each_placeholder_in_place():
    record = normalise(_three_images(), 0)
    assert record.images == ["a.png", "b.png", "c.png"]
    conv = record.conversation
    assert conv.has_image and conv.images_inline and conv.num_images == 3
    assert conv.turns == [
        ("user", "Before: <image>\nAfter: <image>\nWhat changed?"),
        ("assistant", "the colour"),
        ("user", "And this one? <image>\n"),
        ("assistant", "nothing"),
    ]
    assert record.to_row()["image_paths"] == ["a.png", "b.png", "c.png"]
    assert record.to_row()["image_path"] == "a.png"


def test_chat_record_with_several_images_reads_as_the_llava_one():
    chat = {
        "id": "pair-0",
        "images": ["a.png", "b.png", "c.png"],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Before: "}, {"type": "image"},
                                         {"type": "text", "text": "After: "}, {"type": "image"},
                                         {"type": "text", "text": "What changed?"}]},
            {"role": "assistant", "content": "the colour"},
            {"role": "user", "content": [{"type": "text", "text": "And this one? "}, {"type": "image"}]},
            {"role": "assistant", "content": "nothing"},
        ],
    }  # fmt: skip
    record = normalise_chat(chat, 0)
    assert record.images == ["a.png", "b.png", "c.png"]
    assert record.conversation == normalise(_three_images(), 0).conversation
    assert record.conversation.num_images == 3


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (["a.png", "b.png"], "the record has 2 images but 3 '<image>' placeholders in its human turns"),
        (["a.png", "b.png", "c.png", "d.png"], "the record has 4 images but 3 '<image>' placeholders"),
    ],
)
def test_placeholder_count_must_match_the_images(images, message):
    with pytest.raises(RecordError) as info:
        normalise({**_three_images(), "image": images}, 7)
    assert info.value.kind == "placeholder_mismatch"
    assert str(info.value).startswith("record #7 (id 'pair-0'): ")
    assert message in info.value.reason and "put one where each image goes" in info.value.reason


def test_placeholder_in_an_answer_is_refused():
    raw = _three_images()
    raw["conversations"][3] = {"from": "gpt", "value": "<image> nothing"}
    with pytest.raises(RecordError, match="turn 4: '<image>' may only appear in human turns"):
        normalise(raw, 0)


def _write(tmp_path: Path, records: list[dict], images: dict[str, str | None]) -> Path:
    from PIL import Image

    for name, colour in images.items():
        if colour is None:
            (tmp_path / name).write_bytes(b"not an image")
        else:
            Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_data_check_names_each_bad_image_of_a_record(tmp_path):
    path = _write(tmp_path, [_three_images()], {"a.png": "red", "c.png": None})
    insp = inspect_data(path, image_folder=tmp_path)
    assert insp.usable == []
    found = sorted((p.kind, p.reason.split(":")[0]) for p in insp.errors)
    assert found == [("image_missing", "image 2 of 3"), ("image_unreadable", "image 3 of 3")]
    assert all(p.id == "pair-0" and p.index == 0 for p in insp.errors)


@pytest.fixture(scope="module")
def parts(tiny_parts, tmp_path_factory):
    """(tokenizer, processor saved and reloaded as an export's, image tokens per image, image token id)."""
    from transformers import AutoImageProcessor, AutoProcessor, CLIPVisionConfig

    vision_dir, lm_dir = tiny_parts
    tokenizer = load_tokenizer(lm_dir)
    vision = CLIPVisionConfig.from_pretrained(vision_dir)
    export = tmp_path_factory.mktemp("multi-export")
    build_processor(AutoImageProcessor.from_pretrained(vision_dir), tokenizer, vision).save_pretrained(export)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return tokenizer, AutoProcessor.from_pretrained(export), num_image_tokens(vision), image_id


def _blocks(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each run of `token` in `ids`."""
    out: list[tuple[int, int]] = []
    for i, x in enumerate(ids):
        if x == token:
            if out and out[-1][0] + out[-1][1] == i:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((i, 1))
    return out


def test_each_image_expands_where_its_placeholder_is_and_matches_the_chat_template(parts):
    tokenizer, processor, n_img, image_id = parts
    conv = normalise(_three_images(), 0).conversation
    encoder = ConversationEncoder("vicuna_v1", tokenizer, image_id, n_img)
    enc = encoder.encode(conv)
    blocks = _blocks(enc.input_ids, image_id)
    assert [length for _, length in blocks] == [n_img] * 3
    # the text between the blocks is the text between the placeholders
    between = tokenizer.decode(enc.input_ids[blocks[0][0] + n_img : blocks[1][0]], skip_special_tokens=False)
    assert between.strip() == "After:"
    assert enc.image_end == blocks[2][0] + n_img
    # only the answers and their EOS train
    runs = trained_runs(enc.labels)
    assert [tokenizer.decode(r[:-1]).strip() for r in runs] == ["the colour", "nothing"]
    assert all(r[-1] == tokenizer.eos_token_id for r in runs)
    assert all(enc.labels[s : s + n] == [IGNORE_INDEX] * n for s, n in blocks)
    # plain transformers (the export's processor and chat template) builds the same ids from the same images
    image = synthetic_image(processor.image_processor.crop_size["height"])
    got = processor.apply_chat_template(chat_messages(conv, [image] * 3), tokenize=True)
    assert list(got[0]) == enc.input_ids
    # the fast measurement agrees with encode
    lengths = encoder.lengths([conv])
    assert (lengths.total[0], lengths.image_end[0], lengths.first_trained[0]) == (
        len(enc.input_ids),
        enc.image_end,
        enc.first_trained,
    )


def test_plain_template_puts_every_image_before_the_caption(parts):
    tokenizer, processor, n_img, image_id = parts
    conv = Conversation([("user", "<image>\n<image>\nDescribe."), ("assistant", "two squares")], has_image=True)
    enc = ConversationEncoder("plain", tokenizer, image_id, n_img).encode(conv)
    assert enc.input_ids[: 1 + 2 * n_img] == [tokenizer.bos_token_id] + [image_id] * (2 * n_img)
    image = synthetic_image(processor.image_processor.crop_size["height"])
    messages = chat_messages(conv, [image] * 2)
    got = processor.apply_chat_template(messages, tokenize=True, chat_template=PLAIN_CHAT_TEMPLATE)
    assert list(got[0]) == enc.input_ids


def test_single_image_rendering_is_unchanged(parts):
    """A one-image record still puts its image first in the first user turn, wherever its placeholder was."""
    tokenizer, _, n_img, image_id = parts
    encoder = ConversationEncoder("vicuna_v1", tokenizer, image_id, n_img)
    record = normalise({"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "What? <image>"}, {"from": "gpt", "value": "red"}]}, 0)  # fmt: skip
    assert record.images == ["a.png"] and not record.conversation.images_inline
    rendered = encoder.render(record.conversation)
    assert rendered.images == [rendered.text.index("USER: ") + len("USER: ")]
    assert "USER: <image>\nWhat? ASSISTANT:" in rendered.text


def _pair_records(shapes_data) -> list[dict]:
    """Before/after records built from the shapes task's images: two images, the question about the second."""
    instruct = [r for r in json.loads(Path(shapes_data["instruct"]).read_text()) if "image" in r]
    out = []
    for i in range(0, 16, 2):
        first, second = instruct[i], instruct[i + 1]
        question = second["conversations"][0]["value"].replace("<image>", "").strip()
        out.append(
            {
                "id": f"pair-{i}",
                "image": [first["image"], second["image"]],
                "conversations": [
                    {"from": "human", "value": f"Before: <image>\nAfter: <image>\n{question}"},
                    {"from": "gpt", "value": second["conversations"][1]["value"]},
                ],
            }
        )
    return out


def test_collator_stacks_images_in_token_order(parts, shapes_data, tiny_parts, tmp_path):
    from transformers import AutoImageProcessor

    from lvit.data.collator import LlavaCollator
    from lvit.data.images import ImageLoader

    tokenizer, _, n_img, image_id = parts
    pair = normalise(_pair_records(shapes_data)[0], 0)
    single = normalise(json.loads(Path(shapes_data["instruct"]).read_text())[5], 1)
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "red"}]
    text = normalise({"id": "t", "conversations": turns}, 2)
    loader = ImageLoader(AutoImageProcessor.from_pretrained(tiny_parts[0]), shapes_data["images"], "pad")
    encoder = ConversationEncoder("vicuna_v1", tokenizer, image_id, n_img)
    collate = LlavaCollator(encoder, loader, tokenizer.pad_token_id, 512)
    batch = collate([r.to_row() for r in (single, text, pair)])
    expected = loader.pixel_values([loader.load(p) for p in (single.image, *pair.images)])
    assert torch.equal(batch["pixel_values"], expected)  # row by row, placeholder by placeholder
    assert [int((row == image_id).sum()) for row in batch["input_ids"]] == [n_img, 0, 2 * n_img]


@pytest.mark.slow
def test_train_and_generate_on_records_with_several_images(tiny_recipe, shapes_data, tmp_path):
    """A short stage-2 run on before/after records, then `lvit generate` on one: the images are read in order."""
    from typer.testing import CliRunner

    from lvit.cli.app import app
    from lvit.train.run import run

    records = _pair_records(shapes_data)
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(records))
    out = run(tiny_recipe("finetune", out_dir=tmp_path / "run", data={"path": str(data)}, training={"max_steps": 2}))
    log = [json.loads(line) for line in (out / "lvit_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2] and all(e["loss"] > 0 for e in log if "loss" in e)
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps([{**r, "conversations": r["conversations"][:1]} for r in records[:2]]))
    answers = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(
        app,
        ["generate", str(out), "--data", str(questions), "--out", str(answers), "--image-folder",
         str(shapes_data["images"]), "--max-new-tokens", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["pair-0", "pair-2"]
    assert rows[0]["image"] == records[0]["image"]

    # the same answer from plain transformers: the processor's chat template, both images in placeholder order
    from lvit.infer.load import load_model

    loaded = load_model(out, device="cpu")
    loader = loaded.image_loader(shapes_data["images"])
    conv = normalise(json.loads(questions.read_text())[0], 0, require_answer=False).conversation
    ids = loaded.processor.apply_chat_template(
        chat_messages(conv, [synthetic_image()] * 2), tokenize=True, add_generation_prompt=True, return_tensors="pt"
    )
    pixels = loader.pixel_values([loader.load(p) for p in records[0]["image"]])
    model = loaded.model.eval()
    with torch.no_grad():
        got = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
        answer = loaded.processor.tokenizer.decode(got[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert answer == rows[0]["answer"]
        # both images count, each in its place: swapping them changes the next-token logits
        logits = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        swapped = model(input_ids=ids, pixel_values=pixels.flip(0)).logits[0, -1]
    assert not torch.allclose(logits, swapped)

    # the export's self-check runs on these records: the sample's images in order, the chat template's ids
    from lvit.export.exporter import export

    result = export(out, tmp_path / "export")
    assert result.sample.startswith("record 'pair-0'")


def test_several_embedded_images_in_one_row_are_refused_with_the_fix():
    """A Hugging Face dataset's row reads one embedded image; a row with several says how to use them."""
    from types import SimpleNamespace

    from lvit.data.sources import EmbeddedImage

    source = SimpleNamespace(image_column_name="images", name="/data/ds")
    images = [EmbeddedImage(source, 0, 0), EmbeddedImage(source, 0, 1)]
    raw = {"id": "r", "images": images, "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": "A."}]}  # fmt: skip
    with pytest.raises(RecordError) as info:
        normalise_chat(raw, 0)
    assert info.value.kind == "multiple_images" and "the list of their paths" in info.value.reason


def test_convert_round_trips_a_record_with_several_images():
    from lvit.data.convert import to_chat, to_llava

    record = normalise(_three_images(), 0)
    as_chat = to_chat(record)
    assert as_chat["images"] == ["a.png", "b.png", "c.png"]
    assert [p["type"] for p in as_chat["messages"][0]["content"]] == ["text", "image", "text", "image", "text"]
    for back in (normalise_chat(as_chat, 0), normalise(to_llava(record), 0)):
        assert back.images == record.images and back.conversation == record.conversation
