"""Folders written by the previous release (66bac58) still resume, export and chat with this code.

`tests/fixtures/legacy` (see its README.md) was written by the old code: a finished full fine-tune run
(`full-run/`), the same run as it stood when killed during step 4 (`interrupted-run/`: checkpoint-2 and three
log lines, no `lvit_run.json`), the old `lvit export full-run --dtype fp32` (`export/`), the base parts and
data its recipe (`recipe.yaml`, paths relative to the fixture folder) names, and what the old `lvit chat`
answered (`expected.json`). The run files hold absolute paths of the old build folder, which is gone, as for
a run folder copied to another machine. Each test works on a copy in `tmp_path`, from inside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.export.compat import tower_weight_name

pytestmark = pytest.mark.slow  # about 20 s on 2 CPU cores: a resumed run and two exports

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
CHAT = EXPECTED["chat"]


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture, the working folder (the recipe's relative paths resolve from it)."""
    folder = tmp_path / "legacy"
    own = {"README.md", "make_legacy_fixture.py"}  # the fixture's own files, not the old code's (run cards stay)
    shutil.copytree(FIXTURE, folder, ignore=lambda where, names: own & set(names) if Path(where) == FIXTURE else [])
    monkeypatch.chdir(folder)
    return folder


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "lvit_log.jsonl").read_text().splitlines()]


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_fixture_is_the_old_releases_and_its_recorded_paths_are_gone(legacy):
    assert EXPECTED["commit"].startswith("66bac58")
    recipe = (legacy / "full-run" / "lvit_recipe.yaml").read_text()
    assert EXPECTED["build_folder"] in recipe and not Path(EXPECTED["build_folder"]).exists()
    interrupted = legacy / "interrupted-run"
    assert sorted(p.name for p in interrupted.iterdir()) == ["checkpoint-2", "lvit_log.jsonl"]
    assert (legacy / "full-run" / "README.md").is_file() and not (legacy / "make_legacy_fixture.py").exists()
    assert [e["step"] for e in _log(interrupted)] == [1, 2, 3]


def test_interrupted_old_run_resumes_and_finishes_as_the_old_run_did(legacy):
    max_steps, at = EXPECTED["max_steps"], EXPECTED["interrupted_at"]
    _invoke("finetune", "recipe.yaml", "training.output_dir=interrupted-run", "--resume")

    out, old = legacy / "interrupted-run", legacy / "full-run"
    assert (out / "lvit_run.json").is_file()
    state = json.loads((out / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps
    log, old_log = _log(out), _log(old)
    assert [e["step"] for e in log if "loss" in e] == list(range(1, max_steps + 1))
    assert log[:at] == old_log[:at]  # the old run's lines up to its checkpoint, kept as written
    # steps after the checkpoint reach the losses the old code reached in one go
    losses = [e["loss"] for e in log if e.get("step", 0) > at and "loss" in e]
    assert losses == pytest.approx([e["loss"] for e in old_log if e.get("step", 0) > at and "loss" in e], rel=1e-4)
    new, old_weights = load_file(out / "model.safetensors"), load_file(old / "model.safetensors")
    assert new.keys() == old_weights.keys()
    for key in new:
        torch.testing.assert_close(new[key], old_weights[key], rtol=1e-4, atol=1e-5, msg=key)


def _as_if_built_here(folder: Path) -> None:
    """Point the run files' absolute paths at this copy: the run as if it had never moved."""
    for path in folder.rglob("lvit_*.*"):
        if path.suffix in (".yaml", ".json"):
            path.write_text(path.read_text().replace(EXPECTED["build_folder"], str(folder)))


@pytest.mark.parametrize("where", ["in-place", "moved"])
def test_old_run_exports_like_the_old_export(legacy, where):
    """In place: the run's recorded base parts are there. Moved: they are not (the recorded build folder is gone),
    and `--base-model` says where the language model is now: the export's chat-template self-check reads its
    tokenizer (the old code needs that too)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    args = ["export", "full-run", "--out", "new-export", "--dtype", "fp32", "--device", "cpu"]
    if where == "in-place":
        _as_if_built_here(legacy)
    else:
        args += ["--base-model", "language_model=parts/tiny-vicuna"]
    _invoke(*args)
    info = json.loads((legacy / "new-export" / "lvit_export.json").read_text())
    assert info["kind"] == "full" and info["max_abs_diff"] <= info["tolerance"]

    new_weights = load_file(legacy / "new-export" / "model.safetensors")
    old_weights = load_file(legacy / "export" / "model.safetensors")
    # the same tensors; the tower's now under the names transformers 4.x and vLLM read (lvit/export/compat.py)
    assert new_weights.keys() == {tower_weight_name(k) for k in old_weights}
    assert all(torch.equal(new_weights[tower_weight_name(k)], old_weights[k]) for k in old_weights)

    image = Image.open(CHAT["image"]).convert("RGB")
    content = [{"type": "image"}, {"type": "text", "text": CHAT["prompt"]}]
    outputs = {}
    for name in ("export", "new-export"):
        processor = AutoProcessor.from_pretrained(legacy / name)
        model = LlavaForConditionalGeneration.from_pretrained(legacy / name, dtype=torch.float32).eval()
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            outputs[name] = (inputs, model(**inputs).logits)
    (old_inputs, old_logits), (new_inputs, new_logits) = outputs["export"], outputs["new-export"]
    assert old_inputs.keys() == new_inputs.keys()
    assert all(torch.equal(old_inputs[k], new_inputs[k]) for k in old_inputs)  # same processor and template
    assert torch.equal(new_logits, old_logits)


def test_old_export_chats_as_the_old_code_and_the_old_run(legacy):
    from lvit.infer.generation import GenerationSettings, iter_answers
    from lvit.infer.load import load_model
    from lvit.templates.conversation import Conversation

    chat = ["--image", CHAT["image"], "--prompt", CHAT["prompt"], "--max-new-tokens", str(CHAT["max_new_tokens"])]
    answers = [_invoke("chat", "export", *chat).stdout.strip() for _ in range(2)]
    assert answers[0] == answers[1] == CHAT["answers"]["export"]  # greedy: what the old `lvit chat` answered
    assert answers[0]  # a word, not an empty answer
    assert _invoke("chat", "full-run", *chat).stdout.strip() == CHAT["answers"]["full-run"] == answers[0]

    loaded = load_model(legacy / "full-run", device="cpu")
    conv = Conversation(turns=[("user", CHAT["prompt"])], has_image=True)
    settings = GenerationSettings(CHAT["max_new_tokens"])
    _, generated = next(
        iter_answers(loaded.model, loaded.encoder(), loaded.image_loader(), [conv], [CHAT["image"]], settings)
    )
    assert generated == [answers[0]]
