"""Every input lvit reads: image modes, EXIF, padding, LLaVA / chat / Hugging Face datasets, lazy images."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import read_checked, save_llava_dataset
from PIL import Image

from lvit.data.images import ImageLoader, load_rgb, mean_fill, probe_image
from lvit.data.normalise import normalise, normalise_chat
from lvit.data.reader import read_records
from lvit.data.records import RecordError
from lvit.data.sources import detect_format, is_embedded
from lvit.errors import LvitError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ---------------------------------------------------------------------------------------------
# image modes


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.fixture(scope="module")
def mode_images(tmp_path_factory):
    """One small file per mode; pixel (0, 0) is the 'special' pixel, (1, 1) the background."""
    d = tmp_path_factory.mktemp("modes")
    out = {}
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out["RGBA"] = _save(rgba, d / "rgba.png")
    la = Image.new("LA", (8, 6), (100, 0))
    la.putpixel((0, 0), (50, 255))
    out["LA"] = _save(la, d / "la.png")
    p = Image.new("P", (8, 6), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 1)
    out["P"] = _save(p, d / "p.png")
    out["P-transparent"] = _save(p, d / "p_transparent.png", transparency=0)
    out["L"] = _save(Image.new("L", (8, 6), 77), d / "l.png")
    i16 = np.full((6, 8), 40000, dtype=np.uint16)
    i16[0, 0] = 65535
    out["I;16"] = _save(Image.fromarray(i16), d / "i16.png")
    out["CMYK"] = _save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), d / "cmyk.jpg", quality=95)
    one = Image.new("1", (8, 6), 1)
    one.putpixel((0, 0), 0)
    out["1"] = _save(one, d / "one.png")
    return out


@pytest.mark.parametrize(
    "mode, special, background",
    [
        ("RGBA", BLUE, WHITE),  # transparency over white
        ("LA", (50, 50, 50), WHITE),
        ("P", (0, 255, 0), RED),
        ("P-transparent", (0, 255, 0), WHITE),  # palette index 0 is transparent
        ("L", (77, 77, 77), (77, 77, 77)),
        ("I;16", (255, 255, 255), (156, 156, 156)),  # 16-bit scaled to 8 bits: 40000 / 257 -> 156, not clipped
        ("1", (0, 0, 0), WHITE),
    ],
)
def test_every_mode_becomes_rgb(mode_images, mode, special, background):
    with Image.open(mode_images[mode]) as original:
        assert original.mode == mode.split("-")[0]  # the file really is in the mode under test
    img = load_rgb(mode_images[mode])
    assert img.mode == "RGB" and img.size == (8, 6)
    assert img.getpixel((0, 0)) == special
    assert img.getpixel((1, 1)) == background


def test_cmyk_jpeg_becomes_rgb(mode_images):
    img = load_rgb(mode_images["CMYK"])
    r, g, b = img.getpixel((3, 3))
    assert img.mode == "RGB" and r > 230 and g < 30 and b < 30  # cyan 0, magenta + yellow full: red (JPEG: close)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 8 wide x 4 high: left half red, right half blue. EXIF orientation 6 = "rotate 90 degrees clockwise
    # to display": displayed 4 wide x 8 high with the (stored) left half on top.
    img = Image.new("RGB", (8, 4), BLUE)
    img.paste(Image.new("RGB", (4, 4), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=100, subsampling=0)
    assert Image.open(path).size == (8, 4)  # the file itself is not rotated
    out = load_rgb(path)
    assert out.size == (4, 8)
    top, bottom = out.getpixel((2, 1)), out.getpixel((2, 6))
    assert top[0] > 200 and top[2] < 60, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom  # blue at the bottom


def _broken_files(tmp_path):
    rng = np.random.RandomState(0)
    img = Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))
    files = {}
    for fmt, name in (("PNG", "trunc.png"), ("JPEG", "trunc.jpg")):
        buf = io.BytesIO()
        img.save(buf, fmt)
        (tmp_path / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        files[fmt] = tmp_path / name
    (tmp_path / "notes.png").write_bytes(b"these are my notes, not a picture")
    files["text"] = tmp_path / "notes.png"
    return files


def test_broken_files_are_named_problems_not_crashes(tmp_path):
    files = _broken_files(tmp_path)
    assert probe_image(str(files["PNG"]), None)[:2] == ("image_truncated", "error")
    assert probe_image(str(files["JPEG"]), None)[:2] == ("image_truncated", "error")
    assert probe_image(str(files["text"]), None)[:2] == ("image_unreadable", "error")
    assert probe_image(str(tmp_path / "nope.png"), None)[:2] == ("image_missing", "error")
    for path in files.values():
        with pytest.raises(OSError):  # what the collator sees (and turns into an LvitError naming the record)
            load_rgb(path)


def test_decompression_bomb_is_a_problem_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (12, 12)).save(tmp_path / "large.png")  # 144 pixels: over the limit, under twice it
    Image.new("RGB", (20, 20)).save(tmp_path / "bomb.png")  # 400 pixels: over twice the limit
    kind, severity, message = probe_image(str(tmp_path / "large.png"), None)
    assert (kind, severity) == ("image_too_large", "warning") and "downscale" in message
    kind, severity, message = probe_image(str(tmp_path / "bomb.png"), None)
    assert (kind, severity) == ("image_too_large", "error") and "decompression bomb" in message


# ---------------------------------------------------------------------------------------------
# image_aspect_ratio: pad


class _Processor:
    image_mean = CLIP_MEAN


def test_pad_fill_is_llavas_truncated_mean():
    # LLaVA: tuple(int(x*255) for x in processor.image_mean)
    assert mean_fill(_Processor()) == (122, 116, 104)


def test_pad_pads_with_the_mean_colour_before_resizing(tmp_path, tiny_parts):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_parts[0])  # 32 px, CLIP mean / std
    Image.new("RGB", (64, 32), RED).save(tmp_path / "wide.png")  # 2:1, red
    pad = ImageLoader(processor, tmp_path, "pad")
    img = pad.load("wide.png")
    assert img.size == (64, 64)
    assert img.getpixel((0, 0)) == img.getpixel((63, 63)) == (122, 116, 104)
    assert img.getpixel((32, 8)) == (122, 116, 104) and img.getpixel((32, 16)) == img.getpixel((0, 47)) == RED

    values = pad.pixel_values([img])[0]  # (3, 32, 32): red band in rows 8..23, mean colour above and below
    fill = torch_tensor([(v / 255 - m) / s for v, m, s in zip((122, 116, 104), CLIP_MEAN, CLIP_STD, strict=True)])
    red = torch_tensor([(v / 255 - m) / s for v, m, s in zip(RED, CLIP_MEAN, CLIP_STD, strict=True)])
    assert np.allclose(values[:, 0, 0].numpy(), fill, atol=1e-3)
    assert np.allclose(values[:, 31, 31].numpy(), fill, atol=1e-3)
    assert np.allclose(values[:, 16, 16].numpy(), red, atol=1e-3)

    square = ImageLoader(processor, tmp_path, "square").pixel_values([load_rgb(tmp_path / "wide.png")])[0]
    assert np.allclose(square[:, 0, 0].numpy(), red, atol=1e-3)  # resize + centre crop: all red, no padding


def torch_tensor(values):
    return np.asarray(values, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# LLaVA and chat records

LLAVA = [
    {
        "id": "a",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Where?"},
            {"from": "gpt", "value": "Left."},
        ],
    },
    {"id": "b", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]},
    {
        "id": "c",
        "image": "c.png",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Describe it.\n<image>"},
            {"from": "gpt", "value": "A square."},
        ],
    },
]
CHAT = [
    {
        "id": "a",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
            {"role": "user", "content": "Where?"},
            {"role": "assistant", "content": "Left."},
        ],
        "images": ["a.png"],
    },
    {"id": "b", "messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]},
    {
        "id": "c",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Describe it."}, {"type": "image"}]},
            {"role": "assistant", "content": "A square."},
        ],
        "images": ["c.png"],
    },
]


def _same(records_a, records_b):
    key = [(r.id, r.index, r.image, r.conversation) for r in records_a]
    return key == [(r.id, r.index, r.image, r.conversation) for r in records_b]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_chat_records_read_like_their_llava_twins(tmp_path, suffix):
    def write(name, records):
        path = tmp_path / f"{name}{suffix}"
        text = json.dumps(records) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in records)
        path.write_text(text)
        return path

    llava, chat = write("llava", LLAVA), write("chat", CHAT)
    assert detect_format(llava, json.loads(llava.read_text()) if suffix == ".json" else [LLAVA[0]]) == "llava"
    assert detect_format(chat, CHAT) == "chat"
    a, problems_a, total_a = read_records(llava)
    b, problems_b, total_b = read_records(chat)
    assert problems_a == problems_b == [] and total_a == total_b == 3
    assert _same(a, b)
    assert [r.conversation.system for r in b] == [None, None, "Be brief."]
    assert [r.image for r in b] == ["a.png", None, "c.png"]
    if suffix == ".jsonl":
        assert [r.line for r in b] == [1, 2, 3]
    c, _, _ = read_records(chat, "chat")  # named explicitly
    assert _same(b, c)


CHAT_BAD = {
    "image part without an image": (
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                      {"role": "assistant", "content": "A."}]},
        "placeholder_mismatch", "a {'type': 'image'} part appears but the record has no 'images'",
    ),
    "image without an image part": (
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "images": ["a.png"]},
        "placeholder_mismatch", "the record has an image but 0 image parts",
    ),
    "image in a later message": (
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."},
                      {"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "B."}],
         "images": ["a.png"]},
        "placeholder_mismatch", "message 3: an image may only appear in the first user message",
    ),
    "two images, one image part": (
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                      {"role": "assistant", "content": "A."}], "images": ["a.png", "b.png"]},
        "placeholder_mismatch", "the record has 2 images but 1 {'type': 'image'} parts in its user messages",
    ),
    "two images, one in an assistant message": (
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                      {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "A."}]}],
         "images": ["a.png", "b.png"]},
        "placeholder_mismatch", "message 2: an image may only appear in a user message",
    ),
    "unknown role": (
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "bot", "content": "A."}]},
        "unknown_role", "message 2 has unknown role 'bot'",
    ),
    "unknown part": (
        {"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "A."}]},
        "bad_turn", "message 1 part 1 is {'type': 'video'}",
    ),
    "empty text": (
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "  "}]},
        "empty_turn", "message 2 has empty content",
    ),
    "starts with the assistant": (
        {"messages": [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Q?"},
                      {"role": "assistant", "content": "A."}]},
        "starts_with_assistant", "must start with a user message, but message 1 is the 'assistant' one",
    ),
    "starts with the assistant holding the image": (
        {"messages": [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "Hi."}]},
                      {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "images": ["a.png"]},
        "starts_with_assistant", "must start with a user message, but message 1 is the 'assistant' one",
    ),
    "ends with the user": (
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."},
                      {"role": "user", "content": "Q2?"}]},
        "ends_with_user", "must end with an assistant message",
    ),
    "no messages": ({"conversations": []}, "no_conversation", "'messages' is missing or empty"),
    "images not a list of paths": (
        {"messages": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "A."}],
         "images": [3]},
        "bad_image_field", "'images' must be a list of image file paths",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CHAT_BAD))
def test_invalid_chat_records_name_the_record_and_kind(case):
    raw, kind, reason = CHAT_BAD[case]
    with pytest.raises(RecordError) as info:
        normalise_chat({"id": "bad", **raw}, 4)
    err = info.value
    assert (err.kind, err.index, err.id) == (kind, 4, "bad")
    assert reason in err.reason and str(err).startswith("record #4 (id 'bad'): ")


def test_chat_string_content_may_hold_the_placeholder():
    record = normalise_chat(
        {"messages": [{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": "A."}],
         "images": "a.png"}, 0
    )  # fmt: skip
    assert record.image == "a.png" and record.conversation.turns == [("user", "Q?"), ("assistant", "A.")]


def test_format_named_wrong_gives_a_hint(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(CHAT))
    _, problems, _ = read_records(path, "llava")
    assert [p.kind for p in problems] == ["no_conversation"] * 3
    assert "set the format to 'chat'" in problems[0].reason


def test_llava_record_error_kinds():
    raw = {"id": "x", "conversations": [{"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Q?"}]}
    with pytest.raises(RecordError) as info:
        normalise(raw, 0)
    assert info.value.kind == "starts_with_assistant"


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def _pil(colour, size=(12, 10)):
    return Image.new("RGB", size, colour)


def _chat_rows(n, with_images=True):
    rows = []
    for i in range(n):
        colour = ["red", "blue", "green"][i % 3]
        first = [{"type": "image", "text": None}] if with_images and i != 1 else []
        rows.append(
            {
                "id": f"r{i}",
                "messages": [
                    {"role": "user", "content": [*first, {"type": "text", "text": "What colour?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": colour}]},
                ],
                "images": [_pil(colour)] if with_images and i != 1 else [],
            }
        )
    return rows


@pytest.fixture(scope="module")
def hf_datasets(tmp_path_factory):
    """Three datasets on disk: chat rows with embedded images (save_to_disk), LLaVA rows with image paths
    (DatasetDict, save_to_disk) and LLaVA rows with embedded images (parquet)."""
    import datasets

    root = tmp_path_factory.mktemp("hf")
    images = root / "images"
    images.mkdir()
    for colour in ("red", "blue", "green"):
        _pil(colour).save(images / f"{colour}.png")

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
            "images": datasets.List(datasets.Image()),
        }
    )
    chat = datasets.Dataset.from_list(_chat_rows(3), features=features)
    chat.save_to_disk(root / "chat_embedded")

    llava_rows = [
        {
            "id": f"p{i}",
            "image": f"{colour}.png" if i != 2 else None,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?" if i != 2 else "What colour?"},
                {"from": "gpt", "value": colour},
            ],
        }
        for i, colour in enumerate(("red", "blue", "green"))
    ]
    paths = datasets.Dataset.from_list(llava_rows)
    datasets.DatasetDict({"train": paths, "test": paths.select([0])}).save_to_disk(root / "llava_paths")

    embedded = datasets.Dataset.from_list(
        [{**r, "image": _pil(r["image"][:-4]) if r["image"] else None} for r in llava_rows],
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "image": datasets.Image(),
                "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
            }
        ),
    )  # fmt: skip
    embedded.to_parquet(root / "llava_embedded.parquet")
    return {
        "chat": root / "chat_embedded",
        "paths": root / "llava_paths",
        "parquet": root / "llava_embedded.parquet",
        "images": images,
    }


def test_hf_chat_dataset_with_embedded_images_reads_without_decoding(hf_datasets, monkeypatch):
    import PIL.Image

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened while reading records")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    records, problems, total = read_records(hf_datasets["chat"])
    assert (problems, total) == ([], 3)
    assert [r.id for r in records] == ["r0", "r1", "r2"]
    assert is_embedded(records[0].image) and records[1].image is None and is_embedded(records[2].image)
    assert records[0].conversation.turns == [("user", "What colour?"), ("assistant", "red")]
    assert records[0].conversation.has_image and not records[1].conversation.has_image


def test_embedded_images_decode_when_loaded(hf_datasets):
    records, _, _ = read_records(hf_datasets["chat"], "hf")
    loader = ImageLoader(_Processor())
    assert loader.load(records[0].image).getpixel((0, 0)) == RED
    assert loader.load(records[2].image).getpixel((0, 0)) == (0, 128, 0)  # PIL's "green"
    assert probe_image(records[2].image, None) is None
    # an embedded image is named by a string (messages, answer files) and pickles with its dataset
    image = records[2].image
    name = f"the image embedded in row 2 (column 'images' item 0) of {Path(hf_datasets['chat']).resolve()}"
    assert json.loads(json.dumps(image)) == str(image) == name
    clone = pickle.loads(pickle.dumps(image))
    assert (clone, clone.row, clone.item, clone.read()) == (image, 2, 0, image.read())


def test_hf_dataset_dict_with_image_paths_uses_the_train_split(hf_datasets):
    records, problems, total = read_checked(hf_datasets["paths"], hf_datasets["images"])
    assert (problems, total) == ([], 3)
    assert [r.image for r in records] == ["red.png", "blue.png", None]
    records, problems, _ = read_checked(hf_datasets["paths"])  # no image folder: not found
    assert [(p.id, p.kind) for p in problems] == [("p0", "image_missing"), ("p1", "image_missing")]


def test_parquet_with_embedded_images(hf_datasets):
    records, problems, total = read_records(hf_datasets["parquet"])
    assert (problems, total) == ([], 3)
    assert is_embedded(records[1].image) and records[2].image is None
    assert ImageLoader(_Processor()).load(records[1].image).getpixel((5, 5)) == BLUE


def test_a_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(LvitError, match="is a folder but not a dataset"):
        read_records(tmp_path)


@pytest.fixture(scope="module")
def encoder(tiny_parts):
    from transformers import CLIPVisionConfig

    from lvit.model.processor import load_tokenizer
    from lvit.model.towers import num_image_tokens
    from lvit.templates.conversation import IMAGE_PLACEHOLDER
    from lvit.templates.encoder import ConversationEncoder

    tok = load_tokenizer(tiny_parts[1])
    n = num_image_tokens(CLIPVisionConfig.from_pretrained(tiny_parts[0]))
    return ConversationEncoder("vicuna_v1", tok, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), n)


def _collator(encoder, tiny_parts, image_folder=None):
    from transformers import AutoImageProcessor

    from lvit.data.collator import LlavaCollator

    loader = ImageLoader(AutoImageProcessor.from_pretrained(tiny_parts[0]), image_folder)
    return LlavaCollator(encoder, loader, encoder.tokenizer.pad_token_id, 256)


def test_training_rows_keep_embedded_images_undecoded(hf_datasets, encoder, tiny_parts):
    from lvit.data.dataset import prepare
    from lvit.recipe.schema import DataSection

    prepared = prepare(DataSection(path=str(hf_datasets["chat"])), encoder)
    dataset = prepared.dataset
    assert prepared.dropped == [] and prepared.skipped == [] and dataset["id"] == ["r0", "r1", "r2"]
    records, _, _ = read_records(hf_datasets["chat"])
    assert dataset["image_path"] == [str(records[0].image), None, str(records[2].image)]  # names, not pixels
    assert "row 2" in dataset["image_path"][2] and str(hf_datasets["chat"]) in dataset["image_path"][2]
    # the source's image column, undecoded: the encoded bytes, selected from the dataset, not copied into lvit's rows
    images = dataset["image"]
    assert [len(i) for i in images] == [1, 0, 1]
    assert all(i[0]["bytes"].startswith(b"\x89PNG") for i in (images[0], images[2]))
    batch = _collator(encoder, tiny_parts)(list(dataset))
    loader = _collator(encoder, tiny_parts).image_loader
    expected = loader.pixel_values([_pil("red"), _pil("green")])
    assert batch["pixel_values"].shape[0] == 2
    assert np.allclose(batch["pixel_values"].numpy(), expected.numpy())


def test_training_rows_of_a_dataset_with_skipped_records_keep_their_own_images(tmp_path, encoder, tiny_parts):
    """Rows left out (data.on_bad_record: skip) are not selected; every kept row still holds its own image."""

    from lvit.data.dataset import prepare
    from lvit.recipe.schema import DataSection

    colours = ["red", "blue", "green", "white"]
    rows = [
        {
            "id": f"p{i}",
            "image": _pil(colour),
            "conversations": [{"from": "human", "value": "<image>\nColour?" if i != 1 else "Colour?"},
                              {"from": "gpt", "value": colour}],
        }
        for i, colour in enumerate(colours)
    ]  # fmt: skip
    save_llava_dataset(rows, tmp_path / "ds")
    prepared = prepare(DataSection(path=str(tmp_path / "ds"), on_bad_record="skip"), encoder)
    assert [(s.id, s.kind) for s in prepared.skipped] == [("p1", "placeholder_mismatch")]
    dataset = prepared.dataset
    assert dataset["id"] == ["p0", "p2", "p3"] and dataset["index"] == [0, 2, 3]
    assert [r["texts"] for r in dataset] == [["Colour?", c] for c in ("red", "green", "white")]
    loader = _collator(encoder, tiny_parts).image_loader
    batch = _collator(encoder, tiny_parts)(list(dataset))
    expected = loader.pixel_values([_pil(c) for c in ("red", "green", "white")])
    assert np.allclose(batch["pixel_values"].numpy(), expected.numpy())


def test_collator_pickles_and_runs_in_two_workers(hf_datasets, encoder, tiny_parts):
    import torch
    from torch.utils.data import DataLoader

    from lvit.data.dataset import prepare
    from lvit.recipe.schema import DataSection

    dataset = prepare(DataSection(path=str(hf_datasets["chat"])), encoder).dataset
    collator = _collator(encoder, tiny_parts)
    clone = pickle.loads(pickle.dumps(collator))
    rows = list(dataset)
    direct = collator(rows[:2])
    assert all(torch.equal(direct[k], clone(rows[:2])[k]) for k in direct)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collator, shuffle=False)
    batches = list(loader)
    assert len(batches) == 2
    assert all(torch.equal(batches[0][k], direct[k]) for k in direct)
    assert "pixel_values" in batches[1] and batches[1]["pixel_values"].shape[0] == 1


def test_first_records_of_a_dataset_reads_its_first_rows(hf_datasets):
    from lvit.data.reader import first_records

    for name in ("paths", "chat", "parquet"):
        everything, _, _ = read_records(hf_datasets[name])
        first = first_records(hf_datasets[name], limit=2)
        assert [(r.id, r.image, r.conversation) for r in first] == [
            (r.id, r.image, r.conversation) for r in everything[:2]
        ]
