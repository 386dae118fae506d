"""`lvit chat`: multi-turn conversations with the run's template, streamed answers, every kind of model folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.infer.chat import ChatSession, interactive
from lvit.infer.generation import GenerationSettings, iter_answers
from lvit.infer.load import load_model
from lvit.templates.conversation import Conversation

MAX_NEW = 12


def _model_parts(loaded) -> tuple:
    return loaded.model, loaded.encoder(), loaded.image_loader()


@pytest.fixture(scope="module")
def full_run(tiny_runs) -> Path:
    return tiny_runs["full"].out


@pytest.fixture(scope="module")
def image(shapes_data) -> str:
    return str(Path(shapes_data["images"]) / json.loads(Path(shapes_data["test"]).read_text())[0]["image"])


def test_session_keeps_history_and_streams(full_run, image):
    loaded = load_model(full_run, device="cpu")
    session = ChatSession(loaded, image, GenerationSettings(MAX_NEW))
    streamed: list[str] = []
    first = session.ask("What colour is the shape?", streamed.append)
    assert "".join(streamed).strip() == first
    streamed.clear()
    second = session.ask("Where is the shape?", streamed.append)
    assert "".join(streamed).strip() == second
    assert session.turns == [
        ("user", "What colour is the shape?"),
        ("assistant", first),
        ("user", "Where is the shape?"),
        ("assistant", second),
    ]
    # The second answer is what the batch path gives for the same history (image in the first user turn).
    conv = Conversation(turns=session.turns[:3], has_image=True)
    _, expected = next(iter_answers(*_model_parts(loaded), [conv], [image], GenerationSettings(MAX_NEW)))
    assert second == expected[0]
    assert not loaded.model.training


def test_cli_prompt_answers_like_generate(full_run, image):
    result = CliRunner().invoke(
        app,
        ["chat", str(full_run), "--image", image, "--prompt", "Where is the shape?", "--max-new-tokens", str(MAX_NEW)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    loaded = load_model(full_run, device="cpu")
    conv = Conversation(turns=[("user", "Where is the shape?")], has_image=True)
    _, expected = next(iter_answers(*_model_parts(loaded), [conv], [image], GenerationSettings(MAX_NEW)))
    assert result.stdout.strip() == expected[0]


def test_interactive_reads_until_exit_or_eof(full_run, image):
    loaded = load_model(full_run, device="cpu")
    out: list[str] = []
    session = ChatSession(loaded, image, GenerationSettings(4))
    assert interactive(session, io.StringIO("What colour?\n\nWhere?\nexit\nnever asked\n"), out.append) == 2
    assert len(session.turns) == 4 and "".join(out).count("ASSISTANT: ") == 2
    session = ChatSession(loaded, None, GenerationSettings(4))  # text only, ends at EOF
    assert interactive(session, io.StringIO("hello\n"), out.append) == 1
    result = CliRunner().invoke(app, ["chat", str(full_run), "--max-new-tokens", "4"], input="hi\nexit\n")
    assert result.exit_code == 0 and result.stdout.count("USER: ") == 2 and result.stdout.count("ASSISTANT: ") == 1


def test_cli_errors(full_run, tmp_path):
    result = CliRunner().invoke(app, ["chat", str(full_run), "--image", str(tmp_path / "nope.png"), "--prompt", "x"])
    assert result.exit_code == 2 and "nope.png: file not found" in result.output
    result = CliRunner().invoke(app, ["chat", str(tmp_path), "--prompt", "x"])
    assert result.exit_code == 2 and "neither an lvit run folder" in result.output
    result = CliRunner().invoke(app, ["chat", str(full_run), "--prompt", "x", "--top-p", "0"])
    assert result.exit_code == 2 and "--top-p" in result.output


@pytest.mark.parametrize("kind", ["align", "lora", "qlora", "full-4bit"])
def test_every_kind_of_run_chats(kind, tiny_runs, image):
    """Stage 1, LoRA and QLoRA adapters (rebuilt on their base), and a full run loaded in 4-bit."""
    args = []
    if kind == "full-4bit":
        run_dir, args = tiny_runs["full"].out, ["--load-4bit"]
    else:
        run_dir = tiny_runs[kind].out
    result = CliRunner().invoke(
        app,
        [
            "chat",
            str(run_dir),
            "--image",
            image,
            "--prompt",
            "What colour is the shape?",
            "--max-new-tokens",
            "6",
            *args,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    if kind == "lora":
        refused = CliRunner().invoke(app, ["chat", str(run_dir), "--prompt", "x", "--load-4bit"])
        assert refused.exit_code == 2 and "lvit export" in refused.output
    if kind == "full-4bit":
        from lvit.model.quant import linear4bit_modules

        loaded = load_model(run_dir, load_4bit=True, device="cpu")
        names = [name for name, _ in linear4bit_modules(loaded.model)]
        assert names and all(name.startswith("model.language_model.") for name in names)


def test_cli_checks_the_image_before_the_model_loads(full_run, tmp_path, monkeypatch):
    import lvit.infer.load

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before --image was checked")

    monkeypatch.setattr(lvit.infer.load, "load_model", no_loading)
    photo = tmp_path / "photo.jpg"
    photo.write_text("not a photo, a text file")
    for image, message in (
        (photo, f"--image {photo}: image {photo} is not an image file PIL can read"),
        (tmp_path / "nope.png", f"--image {tmp_path / 'nope.png'}: file not found"),
    ):
        result = CliRunner().invoke(app, ["chat", str(full_run), "--image", str(image), "--prompt", "Colour?"])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: {message}")
        assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def two_images(shapes_data) -> list[str]:
    """Two different images of the test split (its records come in pairs about one image)."""
    names = list(dict.fromkeys(r["image"] for r in json.loads(Path(shapes_data["test"]).read_text())))
    return [str(Path(shapes_data["images"]) / name) for name in names[:2]]


def test_two_images_match_plain_transformers(full_run, two_images):
    """Both images in the first user turn, in the order given: the ids, pixels and answer of the processor's
    chat template and `generate` with the same two images."""
    import torch
    from PIL import Image

    loaded = load_model(full_run, device="cpu")
    session = ChatSession(loaded, two_images, GenerationSettings(MAX_NEW))
    question = "What colour is the second shape?"
    ids = session.encoder.encode(session.conversation(question), for_generation=True).input_ids
    pil = [Image.open(p).convert("RGB") for p in two_images]
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": pil[0]}, {"type": "image", "image": pil[1]},
                        {"type": "text", "text": question}],
        }
    ]  # fmt: skip
    plain = loaded.processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert plain["input_ids"][0].tolist() == ids
    image_id = loaded.model.config.image_token_id
    assert ids.count(image_id) == 2 * session.encoder.num_image_tokens
    assert session.image_inputs["pixel_values"].shape[0] == 2 and not torch.equal(*session.image_inputs["pixel_values"])
    assert torch.allclose(session.image_inputs["pixel_values"], plain["pixel_values"])
    answer = session.ask(question)
    model = loaded.model.eval()
    with torch.no_grad():
        out = model.generate(**plain, max_new_tokens=MAX_NEW, do_sample=False)
    tokens = out[0, len(ids) :]
    assert answer == loaded.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    # the later turns carry the images in the first turn only; the CLI answers as the session does
    result = CliRunner().invoke(
        app,
        ["chat", str(full_run), "--image", two_images[0], "--image", two_images[1], "--prompt", question,
         "--max-new-tokens", str(MAX_NEW)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == answer


def test_cli_names_the_missing_second_image_before_the_model_loads(full_run, two_images, tmp_path, monkeypatch):
    import lvit.infer.load

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before every --image was checked")

    monkeypatch.setattr(lvit.infer.load, "load_model", no_loading)
    missing = tmp_path / "after.png"
    result = CliRunner().invoke(
        app, ["chat", str(full_run), "--image", two_images[0], "--image", str(missing), "--prompt", "Colour?"]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: --image {missing} (image 2 of 2): file not found")
    assert "Traceback" not in result.stderr
