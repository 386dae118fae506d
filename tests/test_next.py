"""LLaVA-NeXT's AnyRes on lvit's parts (`lvit.model.next`): the model lvit builds computes what a hand-written
reference of LLaVA-NeXT's AnyRes path computes (best-fit grid, tile order, unpadding by the image's aspect ratio,
a newline closing each row, the whole image first), for images of several aspect ratios, and the processor's
image-token counts are the reference's feature counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from lvit.errors import LvitError
from lvit.model.next import check_pinpoints, default_pinpoints, image_tokens, to_next
from lvit.recipe.schema import ModelSection

SIZES = [(40, 80), (80, 40), (60, 60), (30, 100), (100, 24)]  # (height, width): wide, tall, square, very wide, tall


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice (llava/mm_utils.py, select_best_resolution): the pinpoint that keeps the most of the
    image's pixels once it is scaled to fit, then the one that wastes the least."""
    best, kept_most, waste_least = None, -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - kept
        if kept > kept_most or (kept == kept_most and waste < waste_least):
            best, kept_most, waste_least = (ph, pw), kept, waste
    return best


def reference_features(model, tiles: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """LLaVA-NeXT's AnyRes features of one image (llava/model/llava_arch.py, `spatial_unpad` with `anyres`), from
    its tiles as the processor cut them (the whole image first)."""
    config = model.config
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    side = size // patch
    hidden = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    features = model.model.multi_modal_projector(hidden)
    dim = features.shape[-1]
    ph, pw = best_resolution(height, width, config.image_grid_pinpoints)
    rows, cols = ph // size, pw // size
    assert tiles.shape[0] == rows * cols + 1
    grid = (
        features[1:].reshape(rows, cols, side, side, dim).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
    )
    h, w = grid.shape[:2]
    if width / height > w / h:  # wider than the grid: padding rows above and below
        kept = int(height * (w / width))
        cut = (h - kept) // 2
        grid = grid[cut : h - cut]
    else:
        kept = int(width * (h / height))
        cut = (w - kept) // 2
        grid = grid[:, cut : w - cut]
    newline = model.model.image_newline.expand(grid.shape[0], 1, dim)
    return torch.cat([features[0], torch.cat([grid, newline], dim=1).reshape(-1, dim)])


@pytest.fixture(scope="module")
def next_model(tiny_parts):
    from lvit.model.assemble import assemble

    vision, lm = tiny_parts
    torch.manual_seed(0)
    llava, processor = assemble(ModelSection(vision_tower=str(vision), language_model=str(lm), projector="mlp2x_gelu"))
    model, next_processor = to_next(llava, processor)
    return model.eval(), next_processor


@pytest.fixture(scope="module")
def next_siglip_model(tiny_parts, tmp_path_factory):
    """LLaVA-NeXT on a tiny SigLIP tower: no CLS token, every patch feature kept (strategy `full`)."""
    from lvit.demo.tiny import build_tiny_siglip
    from lvit.model.assemble import assemble

    _, lm = tiny_parts
    tower = build_tiny_siglip(tmp_path_factory.mktemp("siglip") / "tower")
    torch.manual_seed(0)
    llava, processor = assemble(ModelSection(vision_tower=str(tower), language_model=str(lm), projector="mlp2x_gelu"))
    model, next_processor = to_next(llava, processor)
    assert model.config.vision_feature_select_strategy == "full"
    return model.eval(), next_processor


@pytest.mark.parametrize("tower", ["next_model", "next_siglip_model"])
def test_the_next_forward_equals_llava_nexts_anyres_path(request, tower):
    model, processor = request.getfixturevalue(tower)
    side = model.config.vision_config.image_size
    assert model.config.image_grid_pinpoints == default_pinpoints(side)
    embed = model.get_input_embeddings()
    for height, width in SIZES:
        image = Image.new("RGB", (width, height))
        image.putdata([((x * 7 + y) % 256, (x * y) % 256, (y * 5) % 256) for y in range(height) for x in range(width)])
        inputs = processor(text=["USER: <image>\nWhat is it? ASSISTANT:"], images=[image], return_tensors="pt")
        assert inputs["image_sizes"].tolist() == [[height, width]]
        ids = inputs["input_ids"][0]
        image_positions = (ids == model.config.image_token_id).nonzero().flatten()
        with torch.no_grad():
            tiles = inputs["pixel_values"][0]
            ph, pw = best_resolution(height, width, model.config.image_grid_pinpoints)
            tiles = tiles[: (ph // side) * (pw // side) + 1]
            expected = reference_features(model, tiles, height, width)
            assert len(image_positions) == expected.shape[0], (height, width)  # the processor's count
            pinpoints = model.config.image_grid_pinpoints
            assert image_tokens(height, width, model.config.vision_config, pinpoints) == len(image_positions)
            embeds = embed(ids[None]).clone()
            embeds[0, image_positions] = expected
            hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
            want = model.lm_head(hidden)
            got = model(**inputs).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_image_newline_is_drawn_as_llava_next_draws_it(next_model):
    model, _ = next_model
    newline = model.model.image_newline.detach()
    hidden = model.config.text_config.hidden_size
    assert newline.shape == (hidden,)
    assert 0.5 / math.sqrt(hidden) < newline.std().item() < 1.5 / math.sqrt(hidden)


def test_pinpoints_must_be_whole_tiles():
    assert check_pinpoints([[32, 64]], 32, "r") == [[32, 64]]
    with pytest.raises(LvitError, match=r"not whole tiles of the vision tower's 32 px"):
        check_pinpoints([[32, 50]], 32, "r")
    with pytest.raises(LvitError, match="a list of \\[height, width\\] pairs"):
        check_pinpoints([[32]], 32, "r")


@pytest.mark.parametrize("seed", range(3))
def test_image_token_counts_and_training_ids_equal_the_processors(next_model, seed):
    """For images of many sizes, `image_tokens` is the processor's expansion of `<image>`, and the training ids (the
    conversation encoder given those counts) are `apply_chat_template` + the processor's ids."""
    import random

    from lvit.model.encoder import conversation_encoder
    from lvit.model.next import image_tokens
    from lvit.templates.conversation import Conversation

    model, processor = next_model
    config = model.config
    encoder = conversation_encoder("vicuna_v1", processor.tokenizer, config)
    rng = random.Random(seed)
    for _ in range(12):
        height, width = rng.randint(8, 200), rng.randint(8, 200)
        n = image_tokens(height, width, config.vision_config, config.image_grid_pinpoints)
        conv = Conversation([("user", "What is it?"), ("assistant", "A thing.")], has_image=True, image_tokens=(n,))
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A thing."}]},
        ]
        text = processor.apply_chat_template(messages)
        ids = processor(text=[text], images=[Image.new("RGB", (width, height))], return_tensors="pt")["input_ids"][0]
        assert int((ids == config.image_token_id).sum()) == n, (height, width)
        assert encoder.encode(conv).input_ids == ids.tolist(), (height, width)
        lengths = encoder.lengths([conv])
        assert (
            lengths.total == [len(ids)]
            and lengths.image_end[0] == int((ids == config.image_token_id).nonzero().max()) + 1
        )


def _varied_data(folder: Path, n: int = 20) -> Path:
    """`n` LLaVA records whose images come in five aspect ratios (SIZES), a colour each."""
    import json

    images = folder / "images"
    images.mkdir(parents=True)
    records = []
    for i in range(n):
        height, width = SIZES[i % len(SIZES)]
        colour = ("red", "green", "blue", "white")[i % 4]
        Image.new("RGB", (width, height), colour).save(images / f"{i}.png")
        records.append(
            {
                "id": f"r{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": f"It is {colour}."},
                ],
            }
        )
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def _plain_greedy(folder: Path, image: Image.Image, question: str, max_new_tokens: int) -> tuple[list, str]:
    """(prompt ids, answer) of an exported folder in plain transformers, as its model card says to load it."""
    from transformers import AutoImageProcessor, AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    width = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), processor.decode(out[0, width:], skip_special_tokens=True).strip()


@pytest.mark.slow  # two tiny runs, an export and generation, about 40 s
def test_a_tiny_next_model_trains_both_stages_through_the_cli_and_exports(tiny_recipe, tmp_path):
    """Stage 1 as LLaVA-1.5 (architecture llava), then stage 2 as LLaVA-NeXT, on images of five aspect ratios,
    through `lvit finetune`; the run reloads as a stock LlavaNextForConditionalGeneration whose
    image_newline trained; `lvit export` writes a stock folder (self-checked) and plain transformers gives, for each
    aspect ratio, lvit's prompt ids and greedy answer; `lvit generate`'s batch gives the same answers."""
    import json

    import yaml
    from transformers import LlavaNextForConditionalGeneration
    from typer.testing import CliRunner

    from lvit.cli.app import app
    from lvit.infer.chat import ChatSession
    from lvit.infer.generation import GenerationSettings
    from lvit.infer.load import load_model

    runner = CliRunner()
    data = _varied_data(tmp_path / "data")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([
        {"id": r["id"], "image": r["image"], "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": r["conversations"][1]["value"]}]}
        for r in json.loads(data.read_text())
    ]))  # fmt: skip
    stage1 = tiny_recipe.write(
        tmp_path / "s1.yaml",
        "align",
        out_dir=tmp_path / "stage1",
        model={"projector": "mlp2x_gelu"},
        data={"path": str(captions), "image_folder": str(tmp_path / "data" / "images")},
    )
    trained = runner.invoke(app, ["finetune", str(stage1)])
    assert trained.exit_code == 0, trained.output
    raw = tiny_recipe.raw(
        out_dir=tmp_path / "stage2",
        model={"architecture": "llava_next", "projector": "mlp2x_gelu", "projector_from": str(tmp_path / "stage1")},
        data={"path": str(data), "image_folder": str(tmp_path / "data" / "images"), "max_length": 512},
        training={"max_steps": 3},
    )
    (tmp_path / "s2.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["finetune", str(tmp_path / "s2.yaml")])
    assert result.exit_code == 0, result.output
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "stage2")
    assert model.config.image_grid_pinpoints == default_pinpoints(32)
    hidden = model.config.text_config.hidden_size
    start = torch.randn(hidden, generator=torch.Generator().manual_seed(0)) / math.sqrt(hidden)
    assert not torch.equal(model.model.image_newline.detach(), start)  # trained
    log = [json.loads(line) for line in (tmp_path / "stage2" / "lvit_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(math.isfinite(e["loss"]) for e in log)

    exported = runner.invoke(app, ["export", str(tmp_path / "stage2"), "--out", str(tmp_path / "x"), "--dtype", "fp32"])
    assert exported.exit_code == 0, exported.output
    assert "LlavaNextForConditionalGeneration.from_pretrained(" in (tmp_path / "x" / "README.md").read_text()
    gguf = runner.invoke(app, ["export", str(tmp_path / "stage2"), "--out", str(tmp_path / "g"), "--gguf"])
    assert gguf.exit_code == 2 and "--gguf is refused" in gguf.output and not (tmp_path / "g").exists()
    loaded = load_model(tmp_path / "stage2", device="cpu")
    settings = GenerationSettings(max_new_tokens=6)
    question = "What colour is it?"
    answers = []
    for height, width in SIZES:
        path = tmp_path / f"ask-{height}x{width}.png"
        Image.effect_noise((width, height), 60).convert("RGB").save(path)
        session = ChatSession(loaded, path, settings)
        ids = session.encoder.encode(session.conversation(question), for_generation=True).input_ids
        plain_ids, plain_answer = _plain_greedy(tmp_path / "x", Image.open(path).convert("RGB"), question, 6)
        assert ids == plain_ids, (height, width)
        answers.append(session.ask(question))
        assert answers[-1] == plain_answer, (height, width)
    assert any(answers)
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question_id": str(i), "image": f"ask-{h}x{w}.png", "text": question}) + "\n"
            for i, (h, w) in enumerate(SIZES)
        )  # fmt: skip
    )
    generated = runner.invoke(
        app,
        ["generate", str(tmp_path / "stage2"), "--data", str(questions), "--out", str(tmp_path / "answers.jsonl"),
         "--image-folder", str(tmp_path), "--max-new-tokens", "6", "--batch-size", "5"],
    )  # fmt: skip
    assert generated.exit_code == 0, generated.output
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == answers


def test_packed_next_batches_equal_padded_ones_and_the_checks_count_the_collators_tokens(next_model, tmp_path):
    """The checks' lengths (each image's tokens from its header) are the collated lengths, and a packed batch (one
    row, lvit's packed sdpa) gives the padded batch's loss: the images' tiles and sizes follow the packed order."""
    from functools import partial

    import torch.nn.functional as F

    from lvit.data.collator import LlavaCollator
    from lvit.data.dataset import prepare
    from lvit.data.images import ImageLoader
    from lvit.model.encoder import conversation_encoder
    from lvit.model.next import image_tokens
    from lvit.model.packed_attention import use_packed_sdpa
    from lvit.recipe.schema import DataSection
    from lvit.templates.conversation import IGNORE_INDEX

    model, processor = next_model
    config = model.config
    counts = partial(image_tokens, vision_config=config.vision_config, pinpoints=config.image_grid_pinpoints)
    encoder = conversation_encoder("vicuna_v1", processor.tokenizer, config)
    assert encoder.image_tokens_for_size(40, 80) == counts(40, 80)  # a NeXT config's encoder counts by size
    data = _varied_data(tmp_path, 6)
    dataset = prepare(
        DataSection(path=str(data), image_folder=str(tmp_path / "images"), max_length=512), encoder
    ).dataset
    rows = [dataset[i] for i in range(6)]
    loader = ImageLoader(processor.image_processor, tmp_path / "images")
    pad = processor.tokenizer.pad_token_id
    padded = LlavaCollator(encoder, loader, pad, 512)(rows)
    packed = LlavaCollator(encoder, loader, pad, 512, packing=True, max_tokens_per_row=None)(rows)
    assert padded["attention_mask"].sum(1).tolist() == [r["length"] for r in rows]
    assert packed["image_sizes"].tolist() == padded["image_sizes"].tolist() == [list(SIZES[i % 5]) for i in range(6)]

    def loss(batch):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "row_lengths")}
        logits = model(**inputs).logits
        targets = batch["labels"][:, 1:].flatten()
        count = int((targets != IGNORE_INDEX).sum())
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, reduction="sum") / count

    with torch.no_grad():
        want = loss(padded)
        assert use_packed_sdpa(model, 512, min_hidden_size=0) is None  # the tiny model: forced, as training would
        got = loss(packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a LoRA and a QLoRA run of 2 steps and their exports, about 30 s
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_next_under_adapters_keeps_its_image_newline_and_exports(tiny_recipe, tmp_path, method):
    """peft keeps adapters and modules_to_save, not a bare parameter: lvit saves the trained image_newline (fp32)
    beside the adapter of the run and each checkpoint, loads it with the run, merges it into the export (the
    self-check compares logits), and restores it on resume."""
    from safetensors.torch import load_file
    from transformers import LlavaNextForConditionalGeneration

    from lvit.export.exporter import export
    from lvit.infer.load import load_trained
    from lvit.model.next import NEWLINE_FILE, newline_of
    from lvit.model.stages import report_modules
    from lvit.train.run import TrainingRun, run

    overrides = {"method": method, "model": {"architecture": "llava_next"}, "lora": {"r": 8, "alpha": 16}}
    overrides["projector_lr"] = 1e-3
    recipe = tiny_recipe(
        "finetune", out_dir=tmp_path / "run", training={"save_strategy": "steps", "save_steps": 1}, **overrides
    )
    out = run(recipe)
    saved = load_file(str(out / NEWLINE_FILE))["image_newline"]
    hidden = saved.shape[0]
    start = torch.randn(hidden, generator=torch.Generator().manual_seed(0)) / math.sqrt(hidden)
    assert saved.dtype == torch.float32 and not torch.equal(saved, start)
    at_1 = load_file(str(out / "checkpoint-1" / NEWLINE_FILE))["image_newline"]
    assert not torch.equal(at_1, saved) and not torch.equal(at_1, start)

    assert "with `image_newline.safetensors` beside it" in (out / "README.md").read_text()  # the run's card
    trained, _, _ = load_trained(out, masters=True)
    assert torch.equal(newline_of(trained).detach(), saved)
    result = export(out, tmp_path / "x", dtype="fp32")
    assert result.max_abs_diff <= result.tolerance
    exported = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "x", dtype=torch.float32)
    assert torch.equal(exported.model.image_newline.detach(), saved)

    fresh = TrainingRun(tiny_recipe("finetune", out_dir=tmp_path / "again", **overrides)).setup()
    model = fresh.trainer.model
    assert newline_of(model).requires_grad and torch.equal(newline_of(model).detach().float(), start)
    fresh.trainer._load_from_checkpoint(str(out / "checkpoint-1"))
    assert torch.equal(newline_of(model).detach().float(), at_1)
    row = next(r for r in report_modules(model.get_base_model()) if r.name == "model.image_newline")
    assert (row.trainable, row.frozen, row.trainable_dtypes) == (hidden, 0, ("fp32",))  # logged as it trains
    fresh.trainer.create_optimizer()
    lr = next(g["lr"] for g in fresh.trainer.optimizer.param_groups if any(p is newline_of(model) for p in g["params"]))
    assert lr == 1e-3  # the projector's (projector_lr), not the adapters' learning_rate


def test_next_adapters_are_refused_under_sharded_training(tiny_recipe, monkeypatch):
    """DeepSpeed and FSDP shard the parameters: lvit could not save image_newline whole beside the adapter, so a
    LoRA NeXT run under them is refused by name before training."""
    import lvit.train.run
    from lvit.train.trainer import LlavaTrainer

    class Sharded(LlavaTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.is_deepspeed_enabled = True

    monkeypatch.setattr(lvit.train.run, "LlavaTrainer", Sharded)
    recipe = tiny_recipe("finetune", method="lora", model={"architecture": "llava_next"})
    with pytest.raises(LvitError, match="LoRA / QLoRA LLaVA-NeXT run under DeepSpeed or FSDP"):
        lvit.train.run.TrainingRun(recipe).setup()


def test_data_check_and_preview_give_each_images_tokens_from_its_size(tiny_recipe, tmp_path):
    """`lvit data check --recipe` reports the distribution of image tokens per image (each from its header), and
    `lvit data preview` shows each image's count, in its text and JSON; preview's ids are the collator's."""
    import json
    from functools import partial

    from transformers import CLIPVisionConfig
    from typer.testing import CliRunner

    from lvit.cli.app import app
    from lvit.model.next import image_tokens
    from lvit.model.processor import load_tokenizer

    data = _varied_data(tmp_path / "data", 10)
    recipe = tiny_recipe.write(
        tmp_path / "r.yaml",
        model={"architecture": "llava_next"},
        data={"path": str(data), "image_folder": str(tmp_path / "data" / "images"), "max_length": 512},
    )
    vision = CLIPVisionConfig.from_pretrained(tiny_recipe.vision_dir)
    count = partial(image_tokens, vision_config=vision, pinpoints=default_pinpoints(vision.image_size))
    want = [count(*SIZES[i % len(SIZES)]) for i in range(10)]
    assert len(set(want)) >= 4  # the aspect ratios cost different amounts

    runner = CliRunner()
    checked = runner.invoke(app, ["data", "check", "--recipe", str(recipe), "--json"])
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.output)["image_tokens"]
    assert (report["images"], report["total"], report["min"], report["max"]) == (10, sum(want), min(want), max(want))
    assert sum(b["count"] for b in report["histogram"]) == 10
    text = runner.invoke(app, ["data", "check", "--recipe", str(recipe)]).output
    assert f"image tokens per image (AnyRes: from each image's size), 10 images, {sum(want)} in all:" in text

    shown = runner.invoke(app, ["data", "preview", str(recipe), "-n", "5", "--json"])
    assert shown.exit_code == 0, shown.output
    samples = json.loads(shown.output)
    assert [s["image_tokens"] for s in samples] == [[n] for n in want[:5]]
    image_id = load_tokenizer(str(tiny_recipe.lm_dir)).convert_tokens_to_ids("<image>")
    assert [s["input_ids"].count(image_id) for s in samples] == want[:5]
    text = runner.invoke(app, ["data", "preview", str(recipe), "-n", "2"]).output
    assert f"image tokens {want[0]}" in text and f"<image>×{want[0]}" in text and f"<image>×{want[1]}" in text

    # a max_length between the counts: a sample is cut after its image, never inside it, or left out as too long
    limit = sorted(set(want))[-2] + 40
    cut = runner.invoke(app, ["data", "preview", str(recipe), "-n", "5", "--json", "-o", f"data.max_length={limit}"])
    assert cut.exit_code == 0, cut.output
    shown = json.loads(cut.output)
    kept = [s for s in shown if "refused" not in s]
    assert all(len(s["input_ids"]) <= limit and s["input_ids"].count(image_id) == s["image_tokens"][0] for s in kept)
    dropped = [s for s in shown if "refused" in s]
    assert kept and dropped and all("too long" in s["refused"] for s in dropped)
    before = samples[0]["input_ids"].index(image_id)  # the text before the image (the same in every record)
    assert {s["id"] for s in dropped} == {f"r{i}" for i in range(5) if before + want[i] > limit}


@pytest.mark.slow  # two tiny runs of 2 steps, about 10 s
def test_a_streamed_next_run_counts_and_trains_as_the_in_memory_one(tiny_recipe, shapes_data, tmp_path):
    """WebDataset shards whose images come in five aspect ratios: the streamed checks count each image's tokens
    from its header as the in-memory checks do (the same lengths: `lvit data check`), and a max_length between the
    counts leaves out the same samples, so the streamed run trains the in-memory run's steps."""
    import json

    import yaml
    from test_streaming import _in_memory_copy, _records, _streamed_recipe, _write_shards
    from typer.testing import CliRunner

    from lvit.cli.app import app
    from lvit.train.run import run

    images = tmp_path / "shapes"
    images.mkdir()
    records = _records(shapes_data)
    for i, record in enumerate(records):
        if "image" in record:
            height, width = SIZES[i % len(SIZES)]
            Image.open(Path(shapes_data["images"]) / record["image"]).resize((width, height)).save(
                images / record["image"]
            )
    shards = _write_shards(records, images, tmp_path / "wds")
    path, folder = _in_memory_copy(records, images, tmp_path)

    def recipes(max_length: int) -> tuple[dict, dict]:
        streamed = _streamed_recipe(tiny_recipe, shards, tmp_path / "s", shuffle_buffer=0, max_length=max_length)
        streamed["model"]["architecture"] = "llava_next"
        memory = tiny_recipe.raw(
            out_dir=tmp_path / "m",
            model={"architecture": "llava_next"},
            data={"path": str(path), "image_folder": str(folder), "on_bad_record": "skip", "max_length": max_length},
            global_batch_size=8,
            training={"max_steps": 6, "learning_rate": 1e-3, "train_sampling_strategy": "sequential"},
        )
        return streamed, memory

    def check(raw: dict) -> dict:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
        checked = CliRunner().invoke(app, ["data", "check", "--recipe", str(tmp_path / "r.yaml"), "--json"])
        return json.loads(checked.output)

    streamed, memory = (check(raw) for raw in recipes(512))
    assert streamed["sources"][0]["image_tokens"] == memory["image_tokens"]  # per image, from each header
    assert (
        streamed["sources"][0]["lengths"] == memory["lengths"]
        and len({h["count"] for h in memory["lengths"]["histogram"]}) > 2
    )
    streamed_raw, memory_raw = recipes(115)  # the samples of the widest images are too long: left out in both
    streamed, memory = (check(raw) for raw in (streamed_raw, memory_raw))
    dropped = memory["overlong"]["dropped"]
    assert dropped > 0 and streamed["sources"][0]["problems_by_kind"]["too_long"] == dropped
    assert streamed["sources"][0]["trainable"] == memory["trainable"]

    logs = []
    for raw in (streamed_raw, memory_raw):  # within the first pass (the in-memory epoch ends with a short step)
        raw["training"]["max_steps"] = 2
        out = run(tiny_recipe.recipe_from_raw(raw))
        logs.append([json.loads(line) for line in (out / "lvit_log.jsonl").read_text().splitlines()])
    a, b = logs
    assert [e["num_tokens"] for e in a] == [e["num_tokens"] for e in b]  # the same samples, step by step
    assert [e["loss"] for e in a] == pytest.approx([e["loss"] for e in b], rel=1e-5)
