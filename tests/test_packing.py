"""Padding-free packing (`lvit.data.packing`) and the compact LM head (`lvit.train.loss`): the same loss, gradients and
weights as padded batches scored in full, and no attention across packed samples."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from lvit.data.collator import LlavaCollator
from lvit.data.dataset import prepare
from lvit.data.images import ImageLoader
from lvit.data.packing import LONGEST, pack, rows
from lvit.data.records import conversation_from_row
from lvit.errors import LvitError
from lvit.model.assemble import assemble
from lvit.model.packed_attention import PACKED_SDPA, use_packed_sdpa
from lvit.model.stages import apply_stage
from lvit.model.towers import num_image_tokens
from lvit.recipe.attention import check_attention
from lvit.recipe.schema import DataSection, ModelSection
from lvit.templates.conversation import IGNORE_INDEX
from lvit.templates.encoder import ConversationEncoder
from lvit.train.loss import compact_loss

# ---------------------------------------------------------------------------------------------
# layout


def test_rows_fewest_then_even_never_split():
    # first fit needs 3 rows ([0, 2] [1, 3] [4]: widest 8); spread evenly over 3 the widest is 7
    assert rows([5, 4, 3, 2, 6], 8) == [[0, 3], [1, 2], [4]]
    assert rows([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert rows([7, 1, 1, 7], 8) == [[0, 1], [2, 3]]  # evening out would not fit: first fit's layout
    assert rows([5, 4, 3], None) == [[0, 1, 2]]
    assert rows([9, 2], 8) == [[0], [1]]  # a sample longer than the budget gets a row of its own


def test_rows_even_out_what_the_longest_first_spread_leaves_uneven():
    # first fit: [7, 7, 3] + [6, 9], rows of 17 (the longest-first spread is no shorter); one swap gives
    # [7, 9] + [7, 3, 6], rows of 16, the shortest two rows can be
    lengths = [7, 7, 3, 6, 9]
    layout = rows(lengths, 20)
    assert layout == [[0, 4], [1, 2, 3]]
    best = min(
        max(sum(n for n, a in zip(lengths, assign, strict=True) if a == r) for r in (0, 1))
        for assign in itertools.product((0, 1), repeat=len(lengths))
    )
    assert max(sum(lengths[i] for i in row) for row in layout) == best == 16


def test_pack_positions_restart_labels_and_filler():
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    labels = [[-100, 2, 3], [4, 5], [-100, -100, 8, 9]]
    batch, layout = pack(ids, labels, budget=5, pad_token_id=0)
    assert layout == [[0, 1], [2]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # each sample's first label is never scored (as in its own row); the filler trains nothing
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, -100]]
    assert batch["row_lengths"].tolist() == [5, 4]
    assert "attention_mask" not in batch


def test_unsupported_attention_is_refused():
    for ok in ("sdpa", "eager", "flash_attention_2", "lvit_packed_sdpa"):
        check_attention(ok, "here")
    with pytest.raises(LvitError, match="flex_attention.*data.packing=false"):
        check_attention("flex_attention", "recipe.yaml: model.attn_implementation")


def test_recipe_with_unsupported_attention_is_refused_before_loading(tiny_recipe):
    with pytest.raises(LvitError, match="model.attn_implementation.*'flex_attention'"):
        tiny_recipe(model={"attn_implementation": "flex_attention"})
    tiny_recipe(model={"attn_implementation": "flex_attention"}, data__packing=False)  # padded rows: any attention


def test_rows_may_be_narrower_than_max_length_and_always_hold_their_longest_sample(tiny_recipe):
    assert tiny_recipe(data__max_tokens_per_row=100).data.max_tokens_per_row == 100  # below max_length 256
    with pytest.raises(LvitError, match="max_tokens_per_row = 0; it must be 1 or more"):
        tiny_recipe(data__max_tokens_per_row=0)
    assert rows([150, 50, 40, 30], 100) == [[0], [1, 2, 3]]  # the budget rises to the longest sample, 150
    assert rows([90, 50, 40, 30], 100) == [[0], [1, 2], [3]] or rows([90, 50, 40, 30], 100) == [[0], [1, 3], [2]]
    assert rows([150, 50, 40, 30], LONGEST) == rows([150, 50, 40, 30], 150)  # the micro-batch's longest sample
    assert rows([150, 50, 40, 30], None) == [[0, 1, 2, 3]]


def test_the_row_layout_follows_the_attention_kernel(tiny_recipe):
    """sdpa -> lvit's packed sdpa and one row (or, where it does not run, rows of max_length); eager -> rows no
    longer than the longest sample; flash -> one row;
    data.max_tokens_per_row overrides (except under flash, whose varlen kernel needs one row)."""
    from types import SimpleNamespace

    from lvit.train.build import packing_options

    def options(attn, **data):
        text = SimpleNamespace(_attn_implementation=attn)
        model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))
        return packing_options(tiny_recipe(**{f"data__{k}": v for k, v in data.items()}), model)["max_tokens_per_row"]

    assert options("lvit_packed_sdpa") is None and options("flash_attention_2") is None
    assert options("eager") == LONGEST
    assert options("sdpa") == 256  # sdpa the packed kernel did not take: rows of max_length under the block mask
    assert (
        options("eager", max_tokens_per_row=300) == 300 and options("lvit_packed_sdpa", max_tokens_per_row=300) == 300
    )
    assert options("flash_attention_2", max_tokens_per_row=300) is None


# ---------------------------------------------------------------------------------------------
# parity on the tiny model


@pytest.fixture(scope="module")
def parts(tiny_parts, shapes_data):
    """(model builder, rows, padded collator, packed collator) on 6 mixed records of the shapes data."""
    from transformers import AutoImageProcessor, CLIPVisionConfig

    from lvit.model.processor import load_tokenizer

    vision, lm = tiny_parts
    tok = load_tokenizer(lm)
    image_token = tok.convert_tokens_to_ids("<image>")
    n_img = num_image_tokens(CLIPVisionConfig.from_pretrained(vision))
    encoder = ConversationEncoder("vicuna_v1", tok, image_token, n_img)
    section = DataSection(path=str(shapes_data["instruct"]), image_folder=str(shapes_data["images"]), max_length=256)
    dataset = prepare(section, encoder).dataset
    images = [r for r in dataset if r["image_path"] is not None][:4]
    texts = [r for r in dataset if r["image_path"] is None][:2]
    longer = {**images[1], "texts": [*images[1]["texts"][:-1], " ".join([images[1]["texts"][-1]] * 40)]}
    # a longer image record second, so the rows' fill differs
    picked = [images[0], longer, images[2], texts[0], texts[1], images[3]]
    loader = ImageLoader(AutoImageProcessor.from_pretrained(vision), shapes_data["images"])
    lengths = [len(e.input_ids) for e in encoder.encode_many([conversation_from_row(r) for r in picked])]
    budget = 2 * max(lengths)  # three rows of different fill; the even layout puts the last image record second
    padded = LlavaCollator(encoder, loader, tok.pad_token_id, 256)
    packed = LlavaCollator(encoder, loader, tok.pad_token_id, 256, packing=True, max_tokens_per_row=budget)

    def model(dtype="float32", attn=None):
        torch.manual_seed(0)
        packed_sdpa = attn == PACKED_SDPA
        attn = "sdpa" if packed_sdpa else attn
        m, _ = assemble(ModelSection(str(vision), str(lm), torch_dtype=dtype, attn_implementation=attn), on_cpu=True)
        if packed_sdpa:  # the tiny model is below MIN_HIDDEN_SIZE: forced, to test the kernel itself
            assert use_packed_sdpa(m, 256, min_hidden_size=0) is None
        apply_stage(m, "finetune", "linear")
        return m.train()  # dropout is 0 in the tiny configs; train mode as in training

    return model, picked, padded, packed


def trained_count(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def full_loss(model, batch, count):
    """TRL's definition, scored at every position: summed token cross-entropy / trained tokens of the step."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = batch["labels"][:, 1:].flatten()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, reduction="sum") / count


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "row_lengths"}


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(loss_ref, loss_new, ref, new) -> None:
    """The issue's parity bounds: loss within a relative 1e-5, every trainable gradient's cosine >= 0.99999."""
    assert abs(loss_new.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    g_ref, g_new = grads(ref), grads(new)
    assert set(g_ref) == set(g_new) and len(g_ref) > 10
    for name in g_ref:
        cos = F.cosine_similarity(g_ref[name].flatten(), g_new[name].flatten(), dim=0).item()
        assert cos >= 0.99999, (name, cos)


def test_packed_batch_holds_the_samples_and_images_in_reading_order(parts):
    _, picked, padded, packed = parts
    a, b = padded(picked), packed(picked)
    assert b["input_ids"].shape[0] >= 2 and (b["row_lengths"] < b["input_ids"].shape[1]).any()  # several rows, filler
    assert int(b["row_lengths"].sum()) == int(a["attention_mask"].sum())  # every real token, no more
    assert trained_count(a) == trained_count(b)  # what TRL's num_items_in_batch counts
    lengths = a["attention_mask"].sum(1).tolist()
    layout = rows(lengths, packed.max_tokens_per_row)
    for r, row in enumerate(layout):  # each sample's ids, end to end, as in its padded row
        expected = [t for i in row for t in a["input_ids"][i, : lengths[i]].tolist()]
        assert b["input_ids"][r, : len(expected)].tolist() == expected
    # pixel_values: one image per image record, in the order their image tokens are read (row by row)
    with_image = [i for i, row in enumerate(picked) if row["image_path"] is not None]
    reading = [i for row in layout for i in row if i in with_image]
    assert reading != with_image  # the layout does reorder images here, so the test can fail
    expected = torch.stack([a["pixel_values"][with_image.index(i)] for i in reading])
    assert torch.equal(b["pixel_values"], expected)


@pytest.mark.parametrize(
    ("attn", "budget"),
    [("sdpa", "fixture"), ("eager", "fixture"), ("eager", LONGEST), (PACKED_SDPA, None), (PACKED_SDPA, "fixture")],
)
def test_packed_compact_step_equals_padded_full_step_fp32(parts, attn, budget):
    """Every layout and kernel that ships: rows under a budget (sdpa and eager with the block-diagonal mask, and
    the packed sdpa under `data.max_tokens_per_row`), rows of the longest sample (eager's default), one row with
    lvit's packed sdpa (sdpa's default)."""
    build, picked, padded, packed = parts
    if budget != "fixture":
        packed = LlavaCollator(padded.encoder, padded.image_loader, 0, 256, packing=True, max_tokens_per_row=budget)
    a, b = padded(picked), packed(picked)
    count = trained_count(a)
    ref = build(attn="sdpa" if attn == PACKED_SDPA else attn)
    new = build(attn=attn)
    start = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
    loss_ref = full_loss(ref, a, count)
    loss_ref.backward()
    loss_new, _ = compact_loss(new, model_inputs(b), count)
    loss_new.backward()
    assert_same_step(loss_ref, loss_new, ref, new)

    # a few optimizer steps later the weights still agree
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3)
    opt_new = torch.optim.AdamW([p for p in new.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        if step:
            ref.zero_grad()
            new.zero_grad()
            full_loss(ref, a, count).backward()
            compact_loss(new, model_inputs(b), count)[0].backward()
        opt_ref.step()
        opt_new.step()
    # Adam divides by the gradient's running RMS, so entries with near-zero gradients move by ~lr either way:
    # compare the whole update, relative to its size
    moved = dict(new.named_parameters())
    diff = sum(((p - moved[n]) ** 2).sum() for n, p in ref.named_parameters() if n in start) ** 0.5
    update = sum(((p - start[n]) ** 2).sum() for n, p in ref.named_parameters() if n in start) ** 0.5
    print(f"{attn}: update {update.item():.4f}, difference {diff.item():.2e}")
    assert diff / update < 1e-4


def test_packed_step_scored_in_full_equals_padded_step_fp32(parts):
    """Packing alone (`compact_head: false`: TRL's loss, every position scored, `use_cache=False` as TRL's
    `compute_loss` passes it): the same loss and gradients as the padded step."""
    build, picked, padded, packed = parts
    a, b = padded(picked), packed(picked)
    count = trained_count(a)
    ref = build(attn="sdpa")
    new = copy.deepcopy(ref)
    loss_ref = full_loss(ref, a, count)
    loss_ref.backward()
    loss_new = full_loss(new, {**model_inputs(b), "use_cache": False}, count)
    loss_new.backward()
    assert_same_step(loss_ref, loss_new, ref, new)


def test_compact_head_equals_full_scoring_on_padded_batches(parts):
    build, picked, padded, _ = parts
    a = padded(picked)
    count = trained_count(a)
    ref = build()
    new = copy.deepcopy(ref)
    loss_ref = full_loss(ref, a, count)
    loss_ref.backward()
    loss_new, stats = compact_loss(new, a, count)
    loss_new.backward()
    assert abs(loss_new.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item())
    assert stats["tokens"].item() == count
    for name, g in grads(ref).items():
        assert torch.allclose(g, grads(new)[name], rtol=1e-4, atol=1e-7), name
    # a micro-batch with no trained token: a finite zero that still backpropagates (stand-in records)
    empty = {**a, "labels": torch.full_like(a["labels"], IGNORE_INDEX)}
    zero, _ = compact_loss(new, empty, None)
    zero.backward()
    assert zero.item() == 0.0


def test_packed_samples_do_not_see_each_other(parts):
    build, picked, _, _ = parts
    model = build().eval()
    row = [picked[3], picked[2], picked[4]]  # text-only, image, text-only: one row
    enc = parts[2].encoder
    encoded = enc.encode_many([conversation_from_row(r) for r in row])
    ids = [e.input_ids for e in encoded]
    labels = [e.labels for e in encoded]
    changed = [list(x) for x in ids]
    middle = [i for i, t in enumerate(changed[1]) if t != enc.image_token_id]
    for i in middle[5:]:
        changed[1][i] = (changed[1][i] + 7) % 100 + 3  # other text, same length and image
    pixel = parts[2].image_loader.pixel_values([parts[2].image_loader.load(row[1]["image_path"])])

    def logits(sample_ids, position_ids=None):
        batch, _ = pack(sample_ids, labels, None, 0)
        pos = batch["position_ids"] if position_ids is None else position_ids
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], position_ids=pos, pixel_values=pixel, use_cache=False).logits[0]

    first, third = slice(0, len(ids[0])), slice(len(ids[0]) + len(ids[1]), None)
    base, other = logits(ids), logits(changed)
    assert not torch.equal(base[len(ids[0]) : third.start], other[len(ids[0]) : third.start])  # the change shows
    assert torch.equal(base[first], other[first])
    assert torch.equal(base[third], other[third])  # bitwise: nothing of the middle sample reaches the last
    # the check can fail: one running sequence (positions 0..n-1) lets the last sample see the changed one
    running = torch.arange(sum(map(len, ids)))[None]
    assert not torch.equal(logits(ids, running)[third], logits(changed, running)[third])


def test_a_training_model_gets_the_packed_kernel_and_one_row_when_it_is_wide_enough(tiny_recipe, monkeypatch):
    """build_model switches the LM to the packed sdpa (here forced: the tiny LM is below MIN_HIDDEN_SIZE) and the
    collator then packs one row; without it the tiny model keeps sdpa and rows of max_length."""
    import functools
    from types import SimpleNamespace

    import lvit.train.build as build

    recipe = tiny_recipe()
    args = SimpleNamespace(seed=0, use_cpu=True, deepspeed_plugin=None)
    model, _ = build.build_model(recipe, args)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert build.packing_options(recipe, model)["max_tokens_per_row"] == recipe.data.max_length
    monkeypatch.setattr(build, "use_packed_sdpa", functools.partial(use_packed_sdpa, min_hidden_size=0))
    model, _ = build.build_model(recipe, args)
    assert model.config.get_text_config()._attn_implementation == PACKED_SDPA
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert build.packing_options(recipe, model)["max_tokens_per_row"] is None


def test_the_packed_kernel_is_used_where_it_is_exact_and_pays():
    from types import SimpleNamespace

    from lvit.model.packed_attention import packed_sdpa_blocker

    def config(**kw):
        return SimpleNamespace(**{"_attn_implementation": "sdpa", "hidden_size": 4096, "sliding_window": None, **kw})

    assert packed_sdpa_blocker(config(), 2048) is None
    assert packed_sdpa_blocker(config(sliding_window=4096), 2048) is None  # no sample reaches past the window
    assert "sliding window (1024)" in packed_sdpa_blocker(config(sliding_window=1024), 2048)
    assert packed_sdpa_blocker(config(sliding_window=1024, use_sliding_window=False), 2048) is None  # Qwen2's off
    assert "soft-caps" in packed_sdpa_blocker(config(attn_logit_softcapping=50.0), 2048)
    assert "hidden size 64" in packed_sdpa_blocker(SimpleNamespace(_attn_implementation="sdpa", hidden_size=64), 2048)
    assert "'eager'" in packed_sdpa_blocker(SimpleNamespace(_attn_implementation="eager", hidden_size=4096), 2048)


def test_the_recipes_attention_reaches_the_assembled_model(parts):
    """model.attn_implementation is what the LM and the tower run (LlavaForConditionalGeneration's own resolution
    would otherwise put sdpa on both), so the eager parity above runs eager."""
    build = parts[0]
    for attn in ("eager", "sdpa"):
        config = build(attn=attn).config
        assert config.get_text_config()._attn_implementation == attn == config.vision_config._attn_implementation


def test_packed_sdpa_gives_each_sample_its_own_attention_and_leaves_the_rest_to_sdpa(parts):
    """lvit's packed sdpa on one row equals each sample run alone; padded batches and generation (a padding
    mask, a KV cache) are sdpa's own; what is saved names no custom kernel."""
    import tempfile
    from pathlib import Path

    build, picked, padded, _ = parts
    plain, packed_model = build(attn="sdpa").eval(), build(attn=PACKED_SDPA).eval()
    assert packed_model.config.get_text_config()._attn_implementation == PACKED_SDPA
    assert packed_model.config.vision_config._attn_implementation == "sdpa"  # the tower keeps its own
    enc = padded.encoder
    ids = [e.input_ids for e in enc.encode_many([conversation_from_row(r) for r in picked[3:5]])]  # text-only
    batch, _ = pack(ids, ids, None, 0)
    with torch.no_grad():
        together = packed_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        alone = [plain(input_ids=torch.tensor([x]), use_cache=False).logits[0] for x in ids]
        assert torch.allclose(together.logits[0], torch.cat(alone), atol=1e-5, rtol=1e-5)
        a = padded(picked)
        inputs = {k: v for k, v in a.items() if k != "labels"}
        assert torch.allclose(packed_model(**inputs).logits, plain(**inputs).logits, atol=1e-6)
        prompt = torch.tensor([ids[0][:20]])
        assert torch.equal(
            packed_model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False),
            plain.generate(input_ids=prompt, max_new_tokens=6, do_sample=False),
        )
    with tempfile.TemporaryDirectory() as folder:
        packed_model.save_pretrained(folder)
        assert PACKED_SDPA not in Path(folder, "config.json").read_text()


def test_packed_bf16_step_close_to_padded(parts):
    """bf16 weights and activations: the packed, compact step against the padded, full one. Measured on this tiny
    model (2026-11-30, three sample sets): loss rel. difference 1.6e-6 to 1.3e-5, smallest gradient cosine
    0.999992 (the layouts reduce in different orders, and bf16 keeps 8 bits of mantissa); the bounds leave 8x
    room."""
    build, picked, padded, _ = parts
    packed = LlavaCollator(padded.encoder, padded.image_loader, 0, 256, packing=True)  # one row: sdpa's default
    a, b = padded(picked), packed(picked)
    count = trained_count(a)
    ref = build("bfloat16", attn="sdpa")
    new = build("bfloat16", attn=PACKED_SDPA)
    loss_ref = full_loss(ref, a, count)
    loss_ref.backward()
    loss_new, _ = compact_loss(new, model_inputs(b), count)
    loss_new.backward()
    rel = abs(loss_new.item() - loss_ref.item()) / abs(loss_ref.item())
    cos = min(
        F.cosine_similarity(g.float().flatten(), grads(new)[n].float().flatten(), dim=0).item()
        for n, g in grads(ref).items()
    )
    print(f"bf16: loss rel diff {rel:.2e}, min grad cosine {cos:.6f}")
    assert rel < 1e-4
    assert cos > 0.9999


def test_packed_records_with_several_images_keep_their_images_in_token_order(parts, shapes_data):
    """A two-image record packed after others: pixel_values is the images in the order their blocks are read."""
    import json
    from pathlib import Path

    from lvit.data.normalise import normalise

    _, _, padded, _ = parts
    instruct = [r for r in json.loads(Path(shapes_data["instruct"]).read_text()) if "image" in r]
    question = instruct[3]["conversations"][0]["value"].replace("<image>", "").strip()
    pair = {
        "id": "pair",
        "image": [instruct[2]["image"], instruct[3]["image"]],
        "conversations": [
            {"from": "human", "value": f"Before: <image>\nAfter: <image>\n{question}"},
            {"from": "gpt", "value": instruct[3]["conversations"][1]["value"]},
        ],
    }
    records = [normalise(r, i) for i, r in enumerate([instruct[0], pair, instruct[1]])]
    rows_ = [r.to_row() for r in records]
    lengths = [len(e.input_ids) for e in padded.encoder.encode_many([conversation_from_row(r) for r in rows_])]
    budget = max(lengths[1], lengths[0] + lengths[2])  # the single-image records share a row, the pair has one
    assert lengths[1] + min(lengths[0], lengths[2]) > budget, lengths
    assert rows(lengths, budget) == [[0, 2], [1]]
    collate = LlavaCollator(padded.encoder, padded.image_loader, 0, 512, packing=True, max_tokens_per_row=budget)
    batch = collate(rows_)
    loader = padded.image_loader
    reading = [instruct[0]["image"], instruct[1]["image"], instruct[2]["image"], instruct[3]["image"]]
    assert torch.equal(batch["pixel_values"], loader.pixel_values([loader.load(p) for p in reading]))
    image_token = padded.encoder.image_token_id
    assert [int((row == image_token).sum()) for row in batch["input_ids"]] == [2 * padded.encoder.num_image_tokens] * 2


@pytest.mark.parametrize("compact", [True, False])
def test_trained_run_counts_real_tokens_and_logs_trl_metrics(tiny_recipe, compact):
    """A packed run's logged `num_tokens` is the real tokens of its batches (not rows x width), with the compact
    head or TRL's, and the metrics TRL logs are still there."""
    from lvit.train.run import TrainingRun

    run = TrainingRun(
        tiny_recipe(
            compact_head=compact, training={"max_steps": 1, "gradient_accumulation_steps": 1}, global_batch_size=...
        )
    ).setup()
    seen = []
    collator = run.trainer.data_collator

    def counting(rows):
        batch = collator(rows)
        seen.append(int(batch["row_lengths"].sum()))
        return batch

    run.trainer.data_collator = counting  # the data loader is built in train()
    run.train()
    entry = [e for e in run.history_entries() if "loss" in e][0]
    assert seen and entry["num_tokens"] == seen[0] > 0  # the first batch (a second one may be prefetched)
    assert 0.0 <= entry["mean_token_accuracy"] <= 1.0 and entry["entropy"] > 0
