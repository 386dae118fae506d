"""`lvit data preview`: the first samples of a recipe's data, as the collator builds them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.templates.conversation import IGNORE_INDEX


def _collator_batch(recipe, n: int):
    from transformers import AutoImageProcessor

    from lvit.data.check import encoder_from_recipe
    from lvit.data.collator import LlavaCollator
    from lvit.data.dataset import prepare
    from lvit.data.images import ImageLoader
    from lvit.data.reader import read_records

    encoder = encoder_from_recipe(recipe)
    data = recipe.data
    rows = prepare(data, encoder).dataset
    loader = ImageLoader(AutoImageProcessor.from_pretrained(recipe.model.vision_tower), data.image_folder,
                         data.image_aspect_ratio)  # fmt: skip
    pad = encoder.tokenizer.pad_token_id
    first_ids = [r.id for r in read_records(data.path)[0][:n]]
    by_id = {rows[i]["id"]: rows[i] for i in range(len(rows))}
    batch = LlavaCollator(encoder, loader, pad, data.max_length)([by_id[i] for i in first_ids])
    return first_ids, batch, pad


def test_preview_json_is_what_the_collator_builds(tiny_recipe, tmp_path):
    path = tiny_recipe.write(tmp_path / "r.yaml")
    result = CliRunner().invoke(app, ["data", "preview", str(path), "-n", "3", "--json"])
    assert result.exit_code == 0, result.output
    samples = json.loads(result.output)
    ids, batch, pad = _collator_batch(tiny_recipe.recipe_from_raw(tiny_recipe.raw()), 3)
    assert [s["id"] for s in samples] == ids
    for k, sample in enumerate(samples):
        n = int(batch["attention_mask"][k].sum())
        assert sample["input_ids"] == batch["input_ids"][k, :n].tolist()
        assert sample["labels"] == batch["labels"][k, :n].tolist()
        assert any(label != IGNORE_INDEX for label in sample["labels"])


def test_preview_text_marks_trained_spans_and_the_image(tiny_recipe, tmp_path):
    path = tiny_recipe.write(tmp_path / "r.yaml")
    result = CliRunner().invoke(app, ["data", "preview", str(path), "-n", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "record 'ins-0':" in out and "trained" in out
    assert "USER: <image>×16\\n" in out  # the image compact, at its place in the text
    assert " ASSISTANT:[" in out and "</s>]" in out  # the answer and its </s> in brackets
    assert "'<image>'×16" in out  # one table row for the 16 image tokens
    bad = CliRunner().invoke(app, ["data", "preview", str(path), "-n", "0"])
    assert bad.exit_code != 0 and "-n must be at least 1" in bad.output
