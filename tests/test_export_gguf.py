"""`lvit export --gguf`: the GGUF pair llama.cpp and Ollama load, checked in llama.cpp itself.

Tiny runs of two families (Vicuna-style with vicuna_v1; Mistral with `template: auto`, its real chat template) and
both tower kinds are exported with `--gguf --verify-gguf`: llama.cpp (llama-cpp-python, built from source by
`scripts/setup.sh`) loads the files and must give transformers' prompt ids, image rows and greedy tokens at f16.
With a CLIP tower llama.cpp computes other image rows (its class-token order): the check fails and says why, and a
canary test pins what llama.cpp computes there. The fast tests below need neither llama.cpp nor a run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.errors import LvitError
from lvit.export.gguf.mmproj import _projector_tensors, linear_shift, vision_settings
from lvit.export.gguf.modelfile import pieces, render, template
from lvit.export.gguf.spm import sentencepiece_model, space_after_special

FIXTURES = Path(__file__).parent / "fixtures"
CONVERTER = os.environ.get("LVIT_LLAMA_CPP") or str(Path(sys.prefix) / "llama.cpp")


def _llama_cpp_ready() -> str | None:
    """Why the llama.cpp tests cannot run here (None: they can). CI installs both, so there they must run."""
    if not (Path(CONVERTER) / "convert_hf_to_gguf.py").is_file():
        return f"no llama.cpp converter at {CONVERTER} (bash scripts/get_llama_cpp.sh)"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install -e '.[gguf]')"
    return None


_MISSING = _llama_cpp_ready()
needs_llama_cpp = pytest.mark.skipif(_MISSING is not None and not os.environ.get("CI"), reason=f"llama.cpp: {_MISSING}")


# --- fast: no llama.cpp, no run --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "A chat between a curious user and an artificial intelligence assistant. USER: What is it? ASSISTANT:",
        "questions. USER: ",
        "Hello world\n\nnew   lines\ttab",
        "12345 3.14 naïve café 東京 🚀",
    ],
)
def test_rebuilt_sentencepiece_model_tokenizes_as_the_fast_tokenizer(text):
    """Llama 2's real vocabulary: the SentencePiece model rebuilt from tokenizer.json's merges (what llama.cpp's
    converter reads as scores) splits text exactly as transformers does; with the converter's own -1000 scores
    llama.cpp split " USER:" as `▁USE R :`."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tokenizer_json = json.loads((FIXTURES / "llama2-tokenizer" / "tokenizer.json").read_text())
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model(tokenizer_json))
    hf = AutoTokenizer.from_pretrained(FIXTURES / "llama2-tokenizer")
    assert sp.encode(text) == hf(text, add_special_tokens=False).input_ids
    assert space_after_special(tokenizer_json)  # the legacy Llama 2 normalizer prepends ▁ to every piece


def test_a_first_scheme_metaspace_adds_no_space_after_special_tokens():
    first = {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}}
    always = {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}}
    assert not space_after_special(first) and space_after_special(always)


def test_linear_projector_passes_llama_cpps_gelu_unchanged():
    """`linear`: mm.2(gelu(mm.0 x)) with llama.cpp's GELU (x unchanged from 10 up) equals linear_2(linear_1 x)."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    w2, b2 = np.eye(6, dtype=np.float32), np.zeros(6, dtype=np.float32)
    x = rng.normal(size=(20, 5)).astype(np.float32) * 3
    h = x @ w1.T + b1
    shift = linear_shift(h)
    t = _projector_tensors(
        {"linear_1.weight": w1, "linear_1.bias": b1, "linear_2.weight": w2, "linear_2.bias": b2}, "linear", shift
    )
    pre = x @ t["mm.0.weight"].T + t["mm.0.bias"]
    assert pre.min() >= 10  # every value is in llama.cpp's identity branch
    got = pre @ t["mm.2.weight"].T + t["mm.2.bias"]
    np.testing.assert_allclose(got, h @ w2.T + b2, atol=1e-4)


def _config(tmp_path: Path, **top) -> Path:
    config = {
        "vision_config": {"model_type": "clip_vision_model", "num_hidden_layers": 2, "hidden_act": "quick_gelu"},
        "text_config": {"hidden_size": 8},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        **top,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"vision_feature_select_strategy": "full"}, "always drops it"),
        ({"vision_feature_layer": [-2, -5]}, "several layers"),
        ({"vision_config": {"model_type": "pixtral", "num_hidden_layers": 2}}, "CLIP and SigLIP"),
        ({"projector_hidden_act": "relu"}, "no llama.cpp equivalent"),
    ],
)
def test_what_llama_cpps_llava_graph_cannot_compute_is_refused_by_name(tmp_path, top, message):
    with pytest.raises(LvitError, match=message):
        vision_settings(_config(tmp_path, **top))
    assert vision_settings(_config(tmp_path))["feature_index"] == 1  # -2 of 2 layers: hidden_states[1]


# --- the tiny runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_runs(shapes_data, tmp_path_factory):
    """name -> trained run folder, for vicuna-siglip (mlp2x_gelu), mistral-siglip (`auto`, linear) and vicuna-clip."""
    from conftest import TinyRecipes

    from lvit.demo import synthetic
    from lvit.demo.tiny import build_family_lm, build_tiny_parts, build_tiny_siglip
    from lvit.train.run import run

    root = tmp_path_factory.mktemp("gguf")
    clip, vicuna = build_tiny_parts(root / "parts", corpus=[*synthetic.corpus(), "[INST] [/INST]"])
    siglip = build_tiny_siglip(root / "siglip")
    tokenizer = root / "mistral-tokenizer"  # the tiny tokenizer with Mistral's real chat template
    shutil.copytree(vicuna, tokenizer, ignore=shutil.ignore_patterns("*.safetensors", "*config.json"))
    shutil.copy(vicuna / "tokenizer_config.json", tokenizer)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["chat_template"] = (FIXTURES / "mistral-chat-template" / "chat_template.jinja").read_text()
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    mistral = build_family_lm(root / "lm-mistral", "mistral", tokenizer)
    specs = {
        "vicuna-siglip": (siglip, vicuna, "vicuna_v1", "mlp2x_gelu"),
        "mistral-siglip": (siglip, mistral, "auto", "linear"),
        "vicuna-clip": (clip, vicuna, "vicuna_v1", "mlp2x_gelu"),
    }
    runs = {}

    def get(name: str) -> Path:
        if name not in runs:
            tower, lm, template_name, projector = specs[name]
            recipes = TinyRecipes((tower, lm), shapes_data, tmp_path_factory)
            recipe = recipes(
                "finetune",
                out_dir=root / f"run-{name}",
                data__template=template_name,
                model={"projector": projector},
                training={"max_steps": 30},
            )
            runs[name] = run(recipe)
        return runs[name]

    return get


@pytest.fixture(scope="module")
def siglip_export(gguf_runs, tmp_path_factory) -> Path:
    """The vicuna-siglip run exported through the CLI with `--gguf --verify-gguf --quant Q8_0`."""
    if _MISSING is not None and not os.environ.get("CI"):
        pytest.skip(f"llama.cpp: {_MISSING}")
    out = tmp_path_factory.mktemp("siglip-export") / "export"
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(gguf_runs("vicuna-siglip")),
            "--out",
            str(out),
            "--gguf",
            "--verify-gguf",
            "--quant",
            "Q8_0",
            "--llama-cpp",
            CONVERTER,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
@needs_llama_cpp
def test_vicuna_siglip_gguf_answers_as_transformers_token_for_token(gguf_runs, siglip_export):
    from lvit.export.gguf.verify import check_prompts, compare, load_export, references
    from lvit.runs.files import read_run

    out = siglip_export
    names = {p.name for p in out.iterdir()}
    assert {"model-f16.gguf", "mmproj-f16.gguf", "model-Q8_0.gguf", "Modelfile", "model.safetensors"} <= names
    assert not any(n.startswith(".gguf") for n in names)  # the converter's work folder is gone
    info = json.loads((out / "lvit_export.json").read_text())["gguf"]
    f16, q8 = info["checks"]
    assert f16["model"] == "model-f16.gguf" and f16["exact_required"] and f16["ok"]
    assert f16["prompts"] == f16["prompt_ids_equal"] == f16["answers_equal"] == 8
    assert f16["image_difference"] < 0.02 and not q8["exact_required"] and 0 <= q8["top1_agreement"] <= 1
    assert q8["image_difference"] == f16["image_difference"]  # one mmproj: its rows compared once
    _assert_modelfile_follows_the_chat_template(out)  # vicuna_v1's template
    # the same prompts, 16 tokens each whatever the end of turn: every greedy token equal at f16
    model, processor = load_export(out)
    prompts = check_prompts(read_run(gguf_runs("vicuna-siglip")), processor, model.config.vision_config.image_size)
    refs, side = references(model, processor, prompts, ignore_eos=True)
    longer = compare(out / "model-f16.gguf", out / "mmproj-f16.gguf", prompts, refs, side, exact=True)
    assert longer.ok and longer.answers_equal == 8 and all(len(r.tokens) == 16 for r in refs)
    assert len({tuple(r.prompt_ids) for r in refs}) > 1  # the prompts differ (questions of the run's data)


@pytest.mark.slow
@needs_llama_cpp
def test_mistral_auto_template_linear_projector_gguf_is_verified(gguf_runs, tmp_path):
    from lvit.export.exporter import GgufOptions, export

    out = tmp_path / "export"
    result = export(gguf_runs("mistral-siglip"), out, gguf=GgufOptions("f16", None, True, CONVERTER))
    info = result.gguf
    assert info["mmproj"]["projector"] == "linear" and info["mmproj"]["shift"] >= 16
    (check,) = info["checks"]
    assert check["ok"] and check["answers_equal"] == check["prompt_ids_equal"] == 8
    _assert_modelfile_follows_the_chat_template(out)


def _assert_modelfile_follows_the_chat_template(out: Path) -> None:
    """The Modelfile's template, cut from the export's chat template, rebuilds that template's text."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    parts = pieces(processor)
    turns = [("user", "What is it?"), ("assistant", "A red square."), ("user", "Where?")]
    messages = [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns]
    expected = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert processor.tokenizer.bos_token + render(parts, turns) == expected
    modelfile = (out / "Modelfile").read_text()
    assert template(parts) in modelfile and "FROM ./model-f16.gguf" in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile
    assert "{{-" not in modelfile  # Go would trim the template's own spaces


@pytest.mark.slow
@needs_llama_cpp
def test_clip_tower_check_fails_naming_llama_cpps_class_token_order(gguf_runs, tmp_path):
    from lvit.export.exporter import GgufOptions, export

    out = tmp_path / "export"
    with pytest.raises(LvitError, match="class token after the patches"):
        export(gguf_runs("vicuna-clip"), out, gguf=GgufOptions("f16", None, True, CONVERTER))
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, nothing left


@pytest.mark.slow
@pytest.mark.canary
@needs_llama_cpp
def test_canary_llama_cpp_puts_clips_class_token_after_the_patches(gguf_runs, siglip_export, tmp_path):
    """What llama.cpp's LLaVA graph computes with a CLIP tower: the class token appended after the patches (with
    the position rows in that order) and rows 1..n passed on. If llama.cpp adopts CLIP's order this fails: then
    the CLIP check above passes and `_CLIP_NOTE` goes."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lvit.export.exporter import export
    from lvit.export.gguf.mmproj import write_mmproj
    from lvit.export.gguf.runtime import LlamaCpp

    clip_export = tmp_path / "clip"
    export(gguf_runs("vicuna-clip"), clip_export, dtype="fp32")
    processor = AutoProcessor.from_pretrained(clip_export)
    settings = vision_settings(clip_export)
    write_mmproj(clip_export, settings, processor.image_processor.to_dict(), tmp_path / "clip-mmproj.gguf", "f32")
    model = LlavaForConditionalGeneration.from_pretrained(clip_export, dtype=torch.float32).eval()
    image = Image.new("RGB", (32, 32), "white")
    image.paste((200, 30, 30), (4, 4, 20, 20))
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        transformers_rows = model.model.get_image_features(pixel_values=pixels)
        transformers_rows = getattr(transformers_rows, "pooler_output", transformers_rows)
        transformers_rows = torch.cat(list(transformers_rows)).reshape(16, -1).numpy()
        tower = model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)
        emb = tower.embeddings
        patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([patches, emb.class_embedding.expand(1, 1, -1)], dim=1) + emb.position_embedding.weight[None]
        x = tower.pre_layrnorm(x)
        depth = model.config.vision_config.num_hidden_layers + 1 + model.config.vision_feature_layer
        for layer in tower.encoder.layers[:depth]:  # up to hidden_states[vision_feature_layer]
            x = layer(x, attention_mask=None)
            x = x[0] if isinstance(x, tuple) else x
        class_last = model.model.multi_modal_projector(x[:, 1:])[0].numpy()
    # the mmproj with any language model of its width: the image rows do not depend on it
    with LlamaCpp(siglip_export / "model-f16.gguf", tmp_path / "clip-mmproj.gguf") as llm:
        rows = llm.image_embeddings(image)
    scale = np.abs(transformers_rows).max()
    assert np.abs(rows - class_last).max() < 0.01 * scale  # llama.cpp's order, to its GELU's precision
    assert np.abs(rows - transformers_rows).max() > 0.3 * scale  # not CLIP's


def test_gguf_options_need_gguf_and_known_types(tiny_runs, tmp_path):
    run = str(tiny_runs["full"].out)
    runner = CliRunner()
    r = runner.invoke(app, ["export", run, "--out", str(tmp_path / "a"), "--quant", "Q8_0"])
    assert r.exit_code == 2 and "go with --gguf" in r.output
    r = runner.invoke(app, ["export", run, "--out", str(tmp_path / "b"), "--gguf", "--projector-only"])
    assert r.exit_code == 2 and "--projector-only" in r.output
    r = runner.invoke(app, ["export", run, "--out", str(tmp_path / "c"), "--gguf"], env={"LVIT_LLAMA_CPP": None})
    assert r.exit_code == 2 and "convert_hf_to_gguf.py" in r.output and "git clone" in r.output
    r = runner.invoke(app, ["export", run, "--out", str(tmp_path / "d"), "--gguf", "--llama-cpp", str(tmp_path)])
    assert r.exit_code == 2 and "has no convert_hf_to_gguf.py" in r.output
    r = runner.invoke(
        app, ["export", run, "--out", str(tmp_path / "e"), "--gguf", "--quant", "Q3_X", "--llama-cpp", CONVERTER]
    )
    assert r.exit_code == 2 and "unknown type" in r.output
    assert not any(tmp_path.iterdir())  # every refusal came before any work
