"""User mistakes through the CLI, each answered before any model loads with one message (what, where, how to fix) and
the exit status the help promises; nothing written. The dry run and the real run refuse the same recipes. (Runs that
meet a fault mid-training are in tests/test_faults.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvit.cli.app import app


def _invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(shapes_data, n: int = 4) -> list[dict]:
    return [r for r in json.loads(shapes_data["instruct"].read_text()) if "image" in r][:n]


# --- text that is not UTF-8, a byte-order mark, a file of the wrong shape ---------------------------------------------


def test_latin1_text_is_named_by_its_line_in_data_check_dry_run_and_finetune(tmp_path, shapes_data, tiny_recipe):
    rows = _records(shapes_data)
    rows[2] = {**rows[2], "id": "café"}
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(text.encode("latin-1"))
    result, message = _invoke("data", "check", data, "--image-folder", shapes_data["images"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "(line 3)" in message and "not UTF-8 text (byte 0xe9)" in message and "iconv" in message

    out = tmp_path / "run"
    recipe = tiny_recipe.write(tmp_path / "r.yaml", out_dir=out, data={"path": str(data)})
    for argv in (["--dry-run"], []):
        result, message = _invoke("finetune", recipe, *argv)
        assert result.exit_code == (1 if argv else 2), result.output
        assert "not UTF-8 text" in message and "line 3" in message and "Traceback" not in result.output
    assert not out.exists()

    # under skip, that line is one record left out, not a run that cannot start
    recipe = tiny_recipe.write(tmp_path / "skip.yaml", out_dir=out, data={"path": str(data), "on_bad_record": "skip"})
    result, message = _invoke("finetune", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "3 of 4 trainable" in message


def test_a_latin1_recipe_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes("stage: finetune\n# café\n".encode("latin-1"))
    result, message = _invoke("finetune", recipe, "--dry-run")
    assert result.exit_code == 2 and f"{recipe}: line 2, column" in message and "not UTF-8" in message


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_byte_order_mark_is_read_past(tmp_path, shapes_data, suffix):
    rows = _records(shapes_data)
    text = json.dumps(rows, indent=2) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    data = tmp_path / f"bom{suffix}"
    data.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # what Windows tools and Excel write first
    result, message = _invoke("data", "check", data, "--image-folder", shapes_data["images"])
    assert result.exit_code == 0, result.output
    assert "records 4" in message and "trainable 4" in message and "no errors" in message


def test_one_json_object_instead_of_a_list_says_so(tmp_path, shapes_data):
    data = tmp_path / "object.json"
    data.write_text(json.dumps({"data": _records(shapes_data)}, indent=2))
    result, message = _invoke("data", "check", data)
    assert result.exit_code == 2 and "a file holding one object is neither" in message, result.output


# --- data that trains nothing -----------------------------------------------------------------------------------------


def test_data_check_fails_when_nothing_would_train(tmp_path, shapes_data, tiny_recipe):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result, message = _invoke("data", "check", empty)
    assert result.exit_code == 1 and "nothing to train on: the data holds no record" in message, result.output

    recipe = tiny_recipe.write(tmp_path / "r.yaml", data={"overlong": "drop"})
    result, message = _invoke(
        "data",
        "check",
        shapes_data["instruct"],
        "data.max_length=8",
        "--image-folder",
        shapes_data["images"],
        "--recipe",
        recipe,
    )  # fmt: skip (a key=value after DATA overrides the recipe, as for `lvit finetune`)
    assert result.exit_code == 1, result.output
    assert "every trainable record is too long for data.max_length 8; the shortest needs data.max_length >=" in message


# --- amounts a run cannot train with: refused by the dry run and the run alike, before any model loads --------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("training.learning_rate=-1e-4", "training.learning_rate"),
        ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size"),
        ("training.num_train_epochs=0", "training.num_train_epochs"),
        ("projector_lr=0", "projector_lr"),
    ],
)
def test_amounts_that_train_nothing_are_refused_by_dry_run_and_run(tmp_path, tiny_recipe, override, key):
    out = tmp_path / "run"
    extra = {"training": {"max_steps": ...}} if "epochs" in override else {}
    recipe = tiny_recipe.write(tmp_path / "r.yaml", out_dir=out, global_batch_size=..., **extra)
    for argv in (["--dry-run"], []):
        result, message = _invoke("finetune", recipe, override, *argv)
        assert result.exit_code == 2, result.output  # the recipe cannot be read as a run: both stop at once
        assert f"{key} = " in message and "must be" in message and "Traceback" not in result.output
    assert not out.exists()


def test_an_override_error_names_the_override_not_the_file(tmp_path, tiny_recipe):
    recipe = tiny_recipe.write(tmp_path / "base.yaml")
    result, message = _invoke("finetune", recipe, "training.learnig_rate=1e-4", "--dry-run")
    assert result.exit_code == 2
    assert "unknown key 'training.learnig_rate'" in message
    assert "set by the command-line override 'training.learnig_rate=1e-4', not in base.yaml" in message


def test_dry_run_files_a_missing_projector_from_under_its_own_key(tmp_path, tiny_recipe):
    recipe = tiny_recipe.write(tmp_path / "r.yaml", model={"projector_from": str(tmp_path / "gone")})
    result, message = _invoke("finetune", recipe, "--dry-run")
    assert result.exit_code == 1
    assert "FAIL model.projector_from" in message and "FAIL data" not in message


# --- lvit data preview shows what training would leave out as such ---------------------------------------------------


def test_preview_lists_records_training_would_leave_out(tmp_path, shapes_data, tiny_recipe):
    rows = _records(shapes_data, 3)
    rows.insert(1, {"id": "broken", "conversations": []})
    rows[2] = {**rows[2], "id": "no-image", "image": "missing.png"}
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    recipe = tiny_recipe.write(tmp_path / "r.yaml", data={"path": str(data), "on_bad_record": "skip"})
    result, message = _invoke("data", "preview", recipe, "-n", "4", "--json")
    assert result.exit_code == 0, result.output
    samples = json.loads(result.output[result.output.index("[") :])
    assert [s["id"] for s in samples] == [rows[0]["id"], "broken", "no-image", rows[3]["id"]]
    assert "refused" in samples[1] and "refused" in samples[2] and "image not found" in samples[2]["refused"]
    assert "input_ids" in samples[0] and "input_ids" in samples[3]


# --- lvit chat ----------------------------------------------------------------------------------------------------


def test_chat_refuses_placeholders_that_do_not_match_the_images_before_loading(tmp_path, shapes_data):
    images = sorted(shapes_data["images"].glob("*.png"))[:2]
    args = ["chat", tmp_path, "--image", images[0], "--image", images[1], "--prompt", "<image>\nWhat is it?"]
    result, message = _invoke(*args)
    assert result.exit_code == 2
    assert "the prompt holds 1 <image> placeholder(s) for 2 image(s)" in message and "Traceback" not in result.output


def test_chat_on_a_vision_tower_folder_says_what_to_pass(tiny_parts, shapes_data):
    vision, _ = tiny_parts
    image = sorted(shapes_data["images"].glob("*.png"))[0]
    result, message = _invoke("chat", vision, "--image", image, "--prompt", "Hi")
    assert result.exit_code == 2, result.output
    assert "not a LLaVA model" in message and "model.vision_tower" in message and "Traceback" not in result.output
