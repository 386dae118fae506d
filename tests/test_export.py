"""`lvit export`: every kind of run (and checkpoint) -> a stock, self-checked LLaVA folder.

The runs are the session's shared runs (`tiny_runs`, each trained once), exported once per module
(module-scoped fixtures); the tests then inspect the written folders. Loading with plain transformers
happens in one subprocess that must not import lvit or peft.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from lvit.errors import LvitError
from lvit.export.exporter import export, safetensors_keys
from lvit.export.selfcheck import default_tolerance
from lvit.infer.load import load_trained
from lvit.runs.files import EXPORT_INFO_FILE, PROJECTOR_FILE, RECIPE_FILE, RUN_INFO_FILE

ADAPTER_MARKERS = ("lora_", "modules_to_save", "base_layer", "original_module")


@contextmanager
def _logged() -> Iterator[list[str]]:
    """The messages of the "lvit" logger (what the CLI shows) while inside."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("lvit")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def align_run(tiny_runs) -> Path:
    # with checkpoints: a stage-1 checkpoint-N holds the whole model, not the projector
    return tiny_runs["align"].out


@pytest.fixture(scope="module")
def full_run(tiny_runs) -> Path:
    return tiny_runs["full"].out


@pytest.fixture(scope="module")
def lora_run(tiny_runs) -> Path:
    return tiny_runs["lora"].out


@pytest.fixture(scope="module")
def qlora_run(tiny_runs) -> Path:
    return tiny_runs["qlora"].out


@pytest.fixture(scope="module")
def exports(align_run, full_run, qlora_run, tmp_path_factory):
    """name -> (run folder, ExportResult, printed output); fp32 except qlora (the bf16 default)."""
    root = tmp_path_factory.mktemp("exports")
    jobs = {
        "align": (align_run, "fp32"),
        "align-checkpoint": (align_run / "checkpoint-2", "fp32"),
        "full": (full_run, "fp32"),
        "qlora": (qlora_run, None),
        "qlora-checkpoint": (qlora_run / "checkpoint-2", "fp32"),
    }
    out = {}
    for name, (run_dir, dtype) in jobs.items():
        with _logged() as printed:
            result = export(run_dir, root / name, dtype=dtype)
        out[name] = (run_dir, result, "\n".join(printed))
    return out


@pytest.fixture(scope="module")
def cli_export(lora_run, tmp_path_factory):
    """The lora run through the CLI: fp32, small shards, replacing an existing folder."""
    from lvit.cli.app import app

    out = tmp_path_factory.mktemp("cli") / "lora"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    (out / EXPORT_INFO_FILE).write_text("{}")  # what makes it an earlier export, which --overwrite may replace
    args = ["export", str(lora_run), "--out", str(out), "--dtype", "fp32", "--max-shard-size", "200KB", "--overwrite"]
    result = CliRunner().invoke(app, args)
    return result, out


def _all_exports(exports, cli_export):
    """name -> (run folder, export folder, template)."""
    folders = {name: (run_dir, result.path) for name, (run_dir, result, _) in exports.items()}
    folders["lora-cli"] = (None, cli_export[1])
    return folders


# --- the runs' exports -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["align", "align-checkpoint", "full", "qlora", "qlora-checkpoint"])
def test_export_matches_the_trained_model(exports, name):
    run_dir, result, printed = exports[name]
    assert result.path.is_dir() and (result.path / "config.json").is_file()
    assert "max |logit difference|" in printed and f"{result.max_abs_diff:.3g}" in printed
    assert result.max_abs_diff <= result.tolerance
    if name.startswith("qlora"):
        # the trained model computes its 4-bit layers in bf16; the export computes in fp32
        assert result.kind == "qlora" and 0 < result.max_abs_diff < 0.05
    else:
        assert result.max_abs_diff <= 1e-4 and 1e-4 <= result.tolerance < 2e-4
    assert "record 'ins-0'" in result.sample or "record 'cap-0'" in result.sample  # the run's own data


def test_no_adapter_or_quantization_left(exports, cli_export):
    for name, (_, folder) in _all_exports(exports, cli_export).items():
        keys = safetensors_keys(folder)
        assert keys, name
        assert not [k for k in keys if any(m in k for m in ADAPTER_MARKERS)], name
        assert not (folder / "adapter_config.json").exists() and not (folder / "adapter_model.safetensors").exists()
        assert "quantization_config" not in (folder / "config.json").read_text(), name


def _tensor_dtypes(folder: Path) -> set[str]:
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return dtypes


def test_bf16_export_writes_bf16_tensors(exports, cli_export):
    _, result, _ = exports["qlora"]  # exported with the default dtype: bf16
    assert result.dtype == "bf16" and _tensor_dtypes(result.path) == {"BF16"}
    config = json.loads((result.path / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"
    # --dtype fp32 stays fp32
    assert _tensor_dtypes(exports["full"][1].path) == _tensor_dtypes(cli_export[1]) == {"F32"}


def test_model_card_names_the_parts(exports, tiny_parts):
    vision, lm = tiny_parts
    _, result, _ = exports["qlora-checkpoint"]
    card = (result.path / "README.md").read_text()
    for needed in (f".../{vision.name}", f".../{lm.name}", "QLoRA", "checkpoint-2", "projector", "linear", "vicuna_v1"):
        assert needed in card, needed
    # no folder of the machine that trained it: the card travels with the export
    assert str(vision.parent) not in card and str(result.path.parent) not in card
    assert "LlavaForConditionalGeneration.from_pretrained" in card and "apply_chat_template" in card
    assert f"{result.max_abs_diff:.3g}" in card
    assert "method: qlora" in card  # the recipe, embedded
    info = json.loads((result.path / EXPORT_INFO_FILE).read_text())
    assert info["kind"] == "qlora" and info["max_abs_diff"] == result.max_abs_diff
    # a finished run's card shows its training metrics
    full_card = (exports["full"][1].path / "README.md").read_text()
    assert "train_loss" in full_card and "full fine-tune" in full_card
    # a stage-1 model is prompted the way it was trained (plain template), not with the chat template
    assert 'bos_token + "<image>"' in (exports["align"][1].path / "README.md").read_text()


# --- plain transformers, no lvit -----------------------------------------------------------------------------

_PLAIN_LOAD = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

folders, image_path, saved_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
image = Image.open(image_path).convert("RGB")
results, saved = {}, {}
for name, (folder, plain) in folders.items():
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    assert type(model) is LlavaForConditionalGeneration
    if plain:
        prompt = processor.tokenizer.bos_token + "<image>"
    else:
        content = [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]
        messages = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1]:]
    saved[name] = {"inputs": dict(inputs), "logits": logits}
    results[name] = {
        "new_tokens": int(new.numel()),
        "text": processor.decode(new, skip_special_tokens=True),
        "image_processor": type(processor.image_processor).__name__,
    }
torch.save(saved, saved_path)
imported = sorted({m.split(".")[0] for m in sys.modules} & {"lvit", "peft", "bitsandbytes"})
print(json.dumps({"results": results, "imported": imported}))
"""


@pytest.fixture(scope="module")
def plain_load(exports, cli_export, shapes_data, tmp_path_factory):
    folders = {
        name: (str(folder), name.startswith("align")) for name, (_, folder) in _all_exports(exports, cli_export).items()
    }
    image = sorted(shapes_data["images"].iterdir())[0]
    saved = tmp_path_factory.mktemp("plain") / "logits.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOAD, json.dumps(folders), str(image), str(saved)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path_factory.getbasetemp(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(saved)


def test_exports_load_and_generate_with_plain_transformers(plain_load, exports, cli_export):
    report, _ = plain_load
    assert report["imported"] == []  # neither lvit nor peft (nor bitsandbytes) was needed
    assert set(report["results"]) == set(_all_exports(exports, cli_export))
    for name, result in report["results"].items():
        assert result["new_tokens"] == 3, name
        # without torchvision (as here) a plain reload takes the PIL image processor lvit trained with;
        # with torchvision it would not (test_plain_reload_takes_torchvision_when_installed)
        assert result["image_processor"] == "CLIPImageProcessorPil", name


def test_plain_transformers_logits_match_the_run(plain_load, exports, cli_export, lora_run):
    """The stock processor's inputs through the run's model as trained (lvit) == the plain-loaded export."""
    _, saved = plain_load
    runs = {name: run_dir for name, (run_dir, _) in _all_exports(exports, cli_export).items()}
    runs["lora-cli"] = lora_run
    for name in ("align", "full", "lora-cli", "qlora"):
        model, _, run = load_trained(runs[name])
        inputs = saved[name]["inputs"]
        with torch.no_grad():
            expected = model(**inputs).logits.float()
        diff = (saved[name]["logits"] - expected).abs().max().item()
        if name == "qlora":  # bf16 weights and a bf16-computing trained model
            bound = default_tolerance(
                "qlora", torch.bfloat16, torch.float32, torch.bfloat16, expected.abs().max().item()
            )
        else:
            bound = 1e-4
        assert diff <= bound, (name, diff, bound)


# --- the image processor and the model card's snippet --------------------------------------------------------


def test_image_processor_is_pil_in_training_inference_and_export(exports, full_run, tiny_recipe, tmp_path):
    from lvit.infer.load import load_model
    from lvit.model.assemble import assemble

    recipe = tiny_recipe("finetune", tmp_path / "run")
    _, processor = assemble(recipe.model, recipe.source)  # what training uses
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    _, processor, _ = load_trained(full_run)  # the run's model as trained (export self-check, eval)
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    for name in ("full", "qlora"):
        _, result, _ = exports[name]
        # generation and chat load runs and exports through load_model
        loaded = load_model(result.path, device="cpu")
        assert type(loaded.processor.image_processor).__name__ == "CLIPImageProcessorPil"
        assert result.image_processor == "CLIPImageProcessorPil"
        assert json.loads((result.path / EXPORT_INFO_FILE).read_text())["image_processor"] == "CLIPImageProcessorPil"
        assert "| image processor | `CLIPImageProcessorPil` (the PIL backend" in (result.path / "README.md").read_text()
        # transformers 5.24 saves either backend under the one name "CLIPImageProcessor" (the PIL class drops
        # its "Pil" suffix when saving): the saved config names the processor family, not the backend
        saved = json.loads((result.path / "processor_config.json").read_text())["image_processor"]
        assert saved["image_processor_type"] == "CLIPImageProcessor"


def test_plain_reload_takes_torchvision_when_installed(exports, monkeypatch):
    """Why lvit and the model card pin the backend: with torchvision installed, transformers 5.24 asks for its
    torchvision image processor whatever the saved config says. torchvision is not installed here (it would
    replace CPU torch), so it is reported installed and the backend transformers resolves is recorded."""
    import transformers.models.auto.image_processing_auto as auto
    from transformers import AutoImageProcessor

    from lvit.model.processor import load_image_processor

    resolved: list[str] = []
    real = auto._resolve_backend

    def recording(*args):
        resolved.append(real(*args))
        return resolved[-1]

    monkeypatch.setattr(auto, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(auto, "_resolve_backend", recording)
    folder = exports["full"][1].path
    AutoImageProcessor.from_pretrained(folder)  # what a plain AutoProcessor.from_pretrained does for its images
    assert load_image_processor(folder).__class__.__name__ == "CLIPImageProcessorPil"  # lvit; the card's snippet
    AutoImageProcessor.from_pretrained(folder, backend="pil")  # the model card's snippet, as written
    assert resolved == ["torchvision", "pil", "pil"]


_SNIPPET_PROBE = """
import json as _json, sys as _sys
import torch as _torch
_torch.save(inputs["pixel_values"].float().cpu(), _sys.argv[1])
print("PROBE " + _json.dumps({
    "input_ids": inputs["input_ids"][0].tolist(),
    "bos": processor.tokenizer.bos_token_id,
    "tokenizer_alone": processor.tokenizer("a").input_ids,
    "image_processor": type(processor.image_processor).__name__,
    "imported": sorted({m.split(".")[0] for m in _sys.modules} & {"lvit", "peft", "bitsandbytes"}),
}))
"""


def _bos_adding_copy(folder: Path, dest: Path) -> Path:
    """A copy of an export whose tokenizer adds a BOS token by itself, like Vicuna's (the tiny one does not)."""
    from tokenizers import Tokenizer, processors

    shutil.copytree(folder, dest)
    tokenizer = Tokenizer.from_file(str(dest / "tokenizer.json"))
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer.save(str(dest / "tokenizer.json"))
    return dest


def _rotated_transparent_image(shapes_data, path: Path) -> Path:
    """A shapes image, not square, half transparent, stored sideways with an EXIF orientation (6: rotate 90°)."""
    from PIL import Image

    image = Image.open(sorted(shapes_data["images"].iterdir())[0]).convert("RGBA")
    image = image.resize((image.width, image.height * 2 // 3))
    alpha = Image.new("L", image.size, 255)
    alpha.paste(60, (0, 0, image.width // 2, image.height))
    image.putalpha(alpha)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif)
    return path


@pytest.mark.slow  # a fresh Python per card, importing transformers: about 6 s each
@pytest.mark.parametrize("name", ["align", "full", "qlora"])
def test_model_card_snippet_runs_as_written(exports, shapes_data, tmp_path, name):
    """The card's Python block, run with plain transformers: one BOS, and the pixels lvit trains on."""
    from lvit.data.images import ImageLoader
    from lvit.model.processor import load_image_processor

    _, result, _ = exports[name]
    blocks = re.findall(r"```python\n(.*?)```", (result.path / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    snippet = blocks[0]
    folder = _bos_adding_copy(result.path, tmp_path / "export")
    image = _rotated_transparent_image(shapes_data, tmp_path / "image.png")
    for old, new in ((f'path = "path/to/{result.path.name}"', f'path = "{folder}"'), ('"image.jpg"', f'"{image}"')):
        assert snippet.count(old) == 1, old
        snippet = snippet.replace(old, new)
    pixels = tmp_path / "pixels.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", snippet + _SNIPPET_PROBE, str(pixels)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))[6:])
    assert probe["imported"] == []
    assert probe["image_processor"] == "CLIPImageProcessorPil"
    bos, ids = probe["bos"], probe["input_ids"]
    assert probe["tokenizer_alone"][0] == bos  # this tokenizer adds a BOS of its own...
    assert ids[0] == bos and ids.count(bos) == 1  # ...and the snippet's prompt still has exactly one
    # the snippet's image handling == lvit's (EXIF rotation, transparency over white, PIL processor)
    from PIL import Image

    loader = ImageLoader(load_image_processor(result.path))
    expected = loader.pixel_values([loader.load(str(image))])
    as_llava = loader.pixel_values([Image.open(image).convert("RGB")])  # LLaVA: no rotation, alpha dropped
    got = torch.load(pixels)
    if result.dtype == "bf16":
        expected, as_llava = expected.to(torch.bfloat16).float(), as_llava.to(torch.bfloat16).float()
    assert torch.equal(got, expected) and not torch.equal(got, as_llava)


# --- the CLI -------------------------------------------------------------------------------------------------


def test_cli_exports_and_replaces_with_overwrite(cli_export):
    result, out = cli_export
    assert result.exit_code == 0, result.output
    assert "max |logit difference|" in result.output and "ok" in result.output
    info = json.loads((out / EXPORT_INFO_FILE).read_text())
    assert info["kind"] == "lora" and info["dtype"] == "fp32" and info["max_abs_diff"] <= 1e-4
    assert not (out / "stale.txt").exists()  # replaced, after the self-check passed
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not list(out.parent.glob("lora.tmp-*")) and not list(out.parent.glob("lora.old-*"))


def test_cli_bad_run_dir_is_a_short_error(tmp_path):
    from lvit.cli.app import app

    for bad in (tmp_path / "missing", tmp_path):
        result = CliRunner().invoke(app, ["export", str(bad), "--out", str(tmp_path / "out")])
        assert result.exit_code not in (0, None)
        assert "error:" in result.output and "RUN_DIR must be" in result.output
        assert "Traceback" not in result.output
        assert isinstance(result.exception, SystemExit)  # handled, not an escaping exception
    assert not (tmp_path / "out").exists()


# --- projector only ------------------------------------------------------------------------------------------


def test_projector_only_feeds_a_stage2_recipe(align_run, tiny_recipe, tmp_path):
    from lvit.model.assemble import assemble
    from lvit.train.checks import check_inputs

    result = export(align_run, tmp_path / "proj", projector_only=True)
    out = result.path
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [PROJECTOR_FILE, RUN_INFO_FILE, RECIPE_FILE, "README.md", EXPORT_INFO_FILE]
    )
    written = load_file(str(out / PROJECTOR_FILE))
    assert set(written) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    trained = load_file(str(align_run / PROJECTOR_FILE))
    assert all(torch.equal(written[k], trained[k]) for k in trained)  # trained dtype kept by default
    assert result.max_abs_diff == 0.0

    recipe = tiny_recipe("finetune", tmp_path / "stage2", model={"projector_from": str(out)})
    check_inputs(recipe)
    model, _ = assemble(recipe.model, recipe.source)  # what `lvit.train.run` does first
    initial = model.model.multi_modal_projector.state_dict()
    assert all(torch.equal(initial[k], written[k]) for k in written)


def test_projector_only_of_a_lora_run_is_its_trained_projector(lora_run, cli_export, tmp_path):
    result = export(lora_run, tmp_path / "proj", projector_only=True, dtype="fp32")
    written = load_file(str(result.path / PROJECTOR_FILE))
    model, _, _ = load_trained(lora_run)
    wrapper = model.get_base_model().model.multi_modal_projector
    trained = wrapper.modules_to_save["default"].state_dict()
    assert all(torch.equal(written[k], trained[k]) for k in written)
    # and it is the projector of the merged export too
    merged = {}
    for path in cli_export[1].glob("model-*.safetensors"):
        merged.update(load_file(str(path)))
    for name, tensor in written.items():
        assert torch.equal(merged[next(k for k in merged if k.endswith(f"multi_modal_projector.{name}"))], tensor)


# --- refusing and failing ------------------------------------------------------------------------------------


def test_refuses_existing_folder_and_the_run_itself(full_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LvitError, match="exists and is not empty.*--overwrite"):
        export(full_run, out)
    assert (out / "keep.txt").read_text() == "mine"
    for inside in (full_run, full_run.parent):
        with pytest.raises(LvitError, match="destroy the run"):
            export(full_run, inside, overwrite=True)
    with pytest.raises(LvitError, match="--dtype"):
        export(full_run, tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_an_earlier_export(full_run, tiny_runs, tmp_path):
    """`--overwrite` never deletes what `lvit export` did not write: another run, a folder of runs, a checkpoint,
    a folder of the user's, or an export with folders of the user's in it. Each is refused before any work, named,
    and left byte for byte as it was."""
    from lvit.cli.app import app

    other_run = tiny_runs["align"].out
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with_folder = tmp_path / "export-with-data"
    (with_folder / "data").mkdir(parents=True)
    (with_folder / EXPORT_INFO_FILE).write_text("{}")
    checkpoints = sorted(full_run.glob("checkpoint-*"))
    cases = [
        (other_run, "is a training run"),
        (other_run.parent, "is not an lvit export"),
        (mine, "is not an lvit export"),
        (with_folder, "holds folders an export never writes \\(data\\)"),
    ]
    if checkpoints:
        cases.append((checkpoints[-1], "is a training run|is not an lvit export"))
    for out, reason in cases:
        before = _tree(out)
        result = CliRunner().invoke(app, ["export", str(full_run), "--out", str(out), "--overwrite"])
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        assert re.search(reason, message) and str(out) in message, message
        assert _tree(out) == before


def test_failed_self_check_leaves_nothing(full_run, tmp_path, monkeypatch):
    import lvit.export.exporter as export_mod

    real = export_mod.load_merged

    def corrupted(run, dtype):  # a broken merge: one weight off
        model, processor, run = real(run, dtype)
        with torch.no_grad():
            model.lm_head.weight[0] += 1.0
        return model, processor, run

    monkeypatch.setattr(export_mod, "load_merged", corrupted)
    with pytest.raises(LvitError, match="self-check failed.*nothing was written"):
        export(full_run, tmp_path / "new" / "export", dtype="fp32")
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary folder, no parent it created

    out = tmp_path / "export"

    # with --overwrite, the folder that was there survives a failed export
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    (out / EXPORT_INFO_FILE).write_text("{}")
    with pytest.raises(LvitError, match="self-check failed"):
        export(full_run, out, dtype="fp32", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (out / "keep.txt").is_file()


def test_chat_template_ids_differing_from_training_fail_the_export(full_run, tmp_path, monkeypatch):
    """The self-check also builds the training ids and the written processor's `apply_chat_template` ids on
    the run's first records; a chat template that tokenizes otherwise fails the export, nothing written."""
    import lvit.export.exporter as export_mod
    from lvit.export.selfcheck import check_chat_template_ids

    real = export_mod.load_merged
    run = export_mod.read_run(full_run)
    model, processor, _ = real(run, torch.float32)
    assert check_chat_template_ids(run, processor, model.config) == 8  # the first 8 records agree

    def drifted(run, dtype):  # a chat template with one space more after "USER:"
        model, processor, run = real(run, dtype)
        processor.chat_template = processor.chat_template.replace("'USER: '", "'USER:  '")
        return model, processor, run

    monkeypatch.setattr(export_mod, "load_merged", drifted)
    out = tmp_path / "export"
    with pytest.raises(LvitError, match=r"record 'ins-0'.*chat template.*other ids than training.*nothing was written"):
        export(full_run, out, dtype="fp32")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["align", "full", "lora", "qlora"])
def test_run_folders_and_checkpoints_carry_lvits_run_card(tiny_runs, kind):
    """Not the generic card TRL and peft write (a text-generation snippet for a model fine-tuned from "None")."""
    out = tiny_runs[kind].out
    for folder, what in ((out, "an lvit run"), (out / "checkpoint-2", "a checkpoint of an lvit run")):
        card = (folder / "README.md").read_text()
        assert card.startswith(f"# {folder.name}\n") and what in card, card
        assert "library_name" not in card and "huggingface.co/None" not in card
        assert f"lvit export {folder.name}" in card
        assert f".../{Path(tiny_runs[kind].recipe.model.language_model).name}" in card
        assert str(folder.parent) not in card  # no folder of the machine that trained it
    if kind == "align":  # a stage-1 checkpoint holds the whole model; the finished run only the projector
        assert "projector.safetensors" in (out / "README.md").read_text()
        assert "the whole LLaVA model" in (out / "checkpoint-2" / "README.md").read_text()


def test_cards_name_hub_models_and_no_local_folder(tmp_path):
    """A card's `base_model:` lists Hub ids only; a local path is shown by its last part (no machine's folders)."""
    from lvit.runs.files import is_hub_id, portable

    assert is_hub_id("lmsys/vicuna-13b-v1.5") and is_hub_id("openai/clip-vit-large-patch14")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("./parts/lm") and not is_hub_id("/gone/parts/lm")
    assert portable("/home/me/models/vicuna-13b") == ".../vicuna-13b"
    assert portable("lmsys/vicuna-13b-v1.5") == "lmsys/vicuna-13b-v1.5"
