"""Training throughput of lvit's stage-2 run against a plain TRL `SFTTrainer`, on the same model and data.

What it compares
    The same stage-2 (full fine-tune) training, with the same model, records and hyperparameters, done in
    two ways, `--rounds` times. On the CPU the runs of a round go in lock-step (`--schedule lockstep`,
    the default there). The processes start together and take turns one optimizer step at a time:
    baseline step, lvit step, baseline step, and so on. So the changing load of a shared machine falls
    on both alike, which alternating whole runs of minutes (`--schedule sequential`, the GPU default)
    does not achieve.

    - baseline: what a user would write with TRL alone, following TRL's VLM SFT example
      (`examples/scripts/sft_vlm.py`). A stock LLaVA checkpoint is loaded with plain
      `LlavaForConditionalGeneration.from_pretrained` + `AutoProcessor.from_pretrained`. The dataset has
      `messages` + `images` columns, images as a lazily decoded `datasets.Image` feature over the PNG paths.
      `SFTTrainer` picks its vision collator (`DataCollatorForVisionLanguageModeling`) by itself. The
      chat template is a vicuna_v1 template with `{% generation %}` markers around each answer and its
      `</s>` (`VICUNA_V1_GENERATION_TEMPLATE` below), and `assistant_only_loss=True`. Batching is random
      (TRL's default). The vision tower is frozen by hand, as the paper's stage 2 does.
    - lvit: `lvit.train.run.run(recipe)`, what `lvit finetune` runs, with lvit's defaults for stage 2
      (`stage: finetune`, `method: full`): random batches (the baseline's samples in each step),
      padding-free packed rows (`data.packing`: with sdpa, each micro-batch in one row and lvit's packed
      sdpa, which runs each sample's attention alone, `lvit/model/packed_attention.py`) and the compact LM
      head (`compact_head`: logits only at labelled positions).
    Both get the same hyperparameters: learning rate, batch size, one epoch over the same records,
    cosine schedule with 3% warmup, no weight decay, seed, data.max_length = SFTConfig.max_length, and
    no bf16 on the CPU. Activation checkpointing is off on the CPU and on on the GPU, for both. The
    initial weights are the same: lvit's run assembles the same parts with the same seed, and that
    assembled model is the checkpoint the baseline loads.

    The levers are lvit runs with one thing changed (`LEVER_CHANGES`). Each is made in the same round (the
    same lock-step group) as an lvit default run:
    - `plain`: packing and compact head off: lvit as it was before them (random batches, padded rows,
      TRL's fused head scoring every position on the CPU). The reference for "each lever alone";
    - `packing`: `plain` + packing; `compact_head`: `plain` + the compact head;
    - `one_row`: the default with no row budget (`data.max_tokens_per_row` huge): each micro-batch in
      one row (the default layout since lvit's packed sdpa; before it, one row meant attention over the
      whole row);
    - `masked_rows`: lvit's default before its packed sdpa: transformers' sdpa with the block-diagonal mask,
      which computes every masked block, and rows of at most `data.max_length` tokens;
    - `eager`: `model.attn_implementation: eager`, with lvit's layout for it (rows no longer than the
      micro-batch's longest sample); `eager_rows`: eager with rows of at most `data.max_length` tokens;
    - `group_by_length`: the default with length-grouped batches (changes the samples of each step);
    - `workers1`: `training.dataloader_num_workers=1`. In lock-step its worker also prefetches while
      the other runs hold the turn: off its clock, on theirs.

What it reports, per run and per method
    The fraction of the machine's matmul peak reached on real tokens (`mfu`): 6 x P x real tokens / time /
    peak, P the LM's parameters without the input embedding plus the projector, the peak measured in the
    same run with a large matmul (CPU: fp32 2048^3 at the runs' thread count; GPU: bf16 8192^3).

    samples/s and tokens/s over the training loop only, with every step timed. In lock-step a run's time
    is the sum of its own steps: from being given the turn, which comes before the step's batch is
    fetched, to its `on_step_end`. In sequential mode it is the window from the end of `on_train_begin`
    to the last `on_step_end`. An explicit forward+backward on two records, made in `on_train_begin`
    with the gradients then dropped, is the warm-up, so no step has to be left out. lvit's sampler puts
    the longest batch first, so leaving out the first step would favour lvit. Model loading, dataset
    preparation, saving and the held-out evaluation are not timed. Tokens are real tokens, the sum of
    `attention_mask` over the batches the training step received. Padding is 1 - real / padded positions.
    For packed batches the samples are counted by their starts (position 0 inside a row's real part),
    the real tokens by the rows' lengths, and the processed positions are the rows x their width.
    Peak memory is VmHWM (peak RSS) during training on the CPU, reset at the start of training, or
    `torch.cuda.max_memory_allocated` on a GPU. The data time is the time spent fetching batches
    (dataset `__getitem__` + collator, main process only), and the collator time is part of it. Also
    the process CPU seconds while timed.

    The loss side:
    - the mean training loss over the epoch (the same records, in a different order);
    - the loss of each final model on a fixed held-out set (`--held-out` records, never trained on).
      The definition is the same for both: mean negative log-likelihood of the assistant tokens and
      their `</s>`, with the token ids and labels built by lvit's vicuna_v1 encoder, full logits, no
      fused head.
    A setup check compares TRL's collator labels with lvit's on the held-out records: the trained
    tokens must be the same.

    The ratio is lvit / baseline samples/s, per round (the runs next to each other) and as the
    geometric mean over the rounds. The goal is at least 1.6x, with padding under 1% of the processed
    positions, at the same held-out loss.

The data and the model (CPU)
    The synthetic records are in LLaVA format with PNG images drawn by `lvit.demo.synthetic.draw` (112 px). The
    text lengths are spread like LLaVA-Instruct-158K: multi-turn conversations with short and medium
    answers, single-turn detailed descriptions and long "complex reasoning" answers (up to several
    hundred tokens), and about 12% text-only multi-turn records. The vocabulary is pseudo-English
    (Zipf-weighted syllable words, with the shape/colour words of the images). The parts come from
    `lvit.demo.tiny.build_tiny_parts`: CLIP with 4 layers x 256 hidden, 112 px, patch 14 (64 image tokens);
    Llama with 4 layers x 512 hidden, 1376 intermediate and 8 heads. The BPE tokenizer is trained on
    the generated text (4000 merges at most). The LLaVA projector is `mlp2x_gelu`, so the baseline
    needs no frozen identity layer.

    python benchmarks/train_throughput.py --threads 1 --json tt.json      # CPU: ~11 min on 2 shared cores
    python benchmarks/train_throughput.py --records 16 --rounds 1 --levers plain   # smoke test, ~2 min
    python benchmarks/train_throughput.py --data-shape vqa --levers plain           # the second data shape

    `--threads 1` on a machine shared with other work. There, each of torch's 2 OpenMP threads waits
    milliseconds for its core at every operator. This was measured on the 2-core machine used here, at
    load 3-4. The CLIP tower took 0.36 s per batch with 2 threads and 0.034 s with 1. A 4 x 160-token
    forward+backward took 2.7 s with 2 threads and 0.8 s with 1. That fixed cost of about 2 s per step
    hides what padding costs. With 1 thread the step time is proportional to the positions processed.

GPU (UNTESTED: written without a GPU; see RESULTS.md)
    `--gpu-7b-layers N` switches to an LM shaped like Vicuna-7B (4096 hidden, 11008 intermediate, 32
    heads, vocab 32000), cut to N layers, and a CLIP ViT-L/14 at 224 px (256 image tokens). The parts
    are built in bf16 on the GPU. Training runs in bf16 with sdpa attention and activation
    checkpointing; max_length is 2048. It reports tokens/s and MFU = 6 x P x real tokens / time /
    measured bf16 peak, where P is the LM's parameters without the input embedding, plus the
    projector (the frozen vision tower's forward is left out). The bf16 peak is measured with a
    8192^3 bf16 matmul. The goal for stage 2 is an MFU of 45%.

    python benchmarks/train_throughput.py --gpu-7b-layers 32 --rounds 1 --json gpu.json   # 24 or 16 if OOM

This is a benchmark, not a test; pytest does not collect it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    CLIP_VIT_L14,
    GIB,
    cpu_model,
    package_versions,
    proc_status_gib,
    reset_peak_rss,
    syllable_words,
    write_random_clip,
    write_random_llama,
    zipf_cum_weights,
)

# Each lever is lvit's default with one thing changed. `plain` is lvit before packing and the compact head
# (random batches, padded rows, every position scored); `packing` and `compact_head` are `plain` plus that
# one lever; `one_row`: packing with no row budget (the whole micro-batch in one row); `group_by_length`:
# lvit's default with length-grouped batches; `workers1`: one data-loader worker.
LEVERS = (
    "plain",
    "packing",
    "compact_head",
    "one_row",
    "masked_rows",
    "eager",
    "eager_rows",
    "group_by_length",
    "workers1",
)
LEVER_CHANGES = {
    "plain": {"packing": False, "compact_head": False},
    "packing": {"packing": True, "compact_head": False},
    "compact_head": {"packing": False, "compact_head": True},
    "one_row": {"row_budget": 1 << 20},
    "masked_rows": {"masked_rows": True},
    "eager": {"attn": "eager"},
    "eager_rows": {"attn": "eager", "row_budget": "max_length"},
    "group_by_length": {"sampling": "group_by_length"},
    "workers1": {"workers": 1},
}
CPU_LEVERS = "plain,packing,compact_head,one_row"

# vicuna_v1 (lvit.templates.builtin.VicunaV1 / VICUNA_V1_CHAT_TEMPLATE) with `{% generation %}` markers around each
# answer AND its EOS, which is what `assistant_only_loss=True` needs: what a TRL user writes for LLaVA-v1 data.
# The baseline's own copy on purpose (it must not use lvit's code), so pylint's duplicate check skips it.
# pylint: disable=duplicate-code
VICUNA_V1_GENERATION_TEMPLATE = (
    "{%- set system = 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' -%}"
    "{{- bos_token + system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- (' ' if loop.first else '') + 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- ' ASSISTANT:' -}}"
    "{%- else -%}"
    "{%- if message['content'] is string -%}{%- set answer = message['content'] -%}"
    "{%- else -%}{%- set answer = message['content'][0]['text'] -%}{%- endif -%}"
    "{%- generation -%}{{- ' ' + answer + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# pylint: enable=duplicate-code

CPU_SHAPE = {
    "vision": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=112,
        patch_size=14,
        projection_dim=256,
    ),
    "text": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "vocab": 4000,
    "max_length": 1024,
}
# Vicuna-7B (LLaMA-7B) and CLIP ViT-L/14 at 224 px; the LM's layer count comes from --gpu-7b-layers.
GPU_SHAPE = {
    "vision": CLIP_VIT_L14,
    "text": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "vocab": 32000,
    "max_length": 2048,
}

# ---------------------------------------------------------------------------------------------
# synthetic LLaVA-Instruct-like data

DATA_SHAPES = ("instruct", "vqa")

COLOURS = ("red", "green", "blue", "yellow")
PLACES = ("left", "right", "top", "bottom")
SHAPES = ("square", "circle")
DETAIL_QUESTIONS = (
    "Describe the following image in detail.",
    "Explain the visual content of the image in great detail.",
    "Can you elaborate on the elements of the picture provided?",
    "What do you see happening in this image?",
)


def _words(rng: random.Random, n: int = 3000) -> list[str]:
    words = syllable_words(rng, n * 2, (1, 1, 2, 2, 2, 3, 3, 4))
    common = ["the", "a", "is", "of", "in", "on", "and", "to", "with", "there", "this", "image", "shape"]
    return common + [*COLOURS, *PLACES, *SHAPES] + sorted(words - set(common))[:n]


class TextGen:
    """Pseudo-English sentences with Zipf-distributed words, and answers of a target word count."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words = _words(rng)
        self.cum = zipf_cum_weights(len(self.words), 1.05)

    def sentence(self, lo: int = 6, hi: int = 18) -> str:
        k = self.rng.randint(lo, hi)
        text = " ".join(self.rng.choices(self.words, cum_weights=self.cum, k=k))
        if self.rng.random() < 0.3 and k > 6:
            cut = self.rng.randint(2, k - 2)
            parts = text.split(" ")
            text = " ".join(parts[:cut]) + ", " + " ".join(parts[cut:])
        return text[0].upper() + text[1:] + self.rng.choice((".", ".", ".", "!", ";"))

    def question(self, lo: int = 5, hi: int = 16) -> str:
        return self.sentence(lo, hi)[:-1] + "?"

    def answer(self, n_words: int, lead: str = "") -> str:
        out, count = ([lead], len(lead.split())) if lead else ([], 0)
        while count < n_words:
            s = self.sentence(6, 20)
            out.append(s)
            count += len(s.split())
        return " ".join(out)


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(median * math.exp(rng.gauss(0.0, sigma))))))


def make_records(
    n: int, rng: random.Random, gen: TextGen, prefix: str, max_words: int, data_shape: str = "instruct"
) -> list[dict]:
    """`instruct`: a LLaVA-Instruct-158K-like mix: 88% image records (conversation 45%, detailed description 15%,
    complex reasoning 40%) and 12% text-only multi-turn records. `vqa`: every record has an image; 85% are
    one to three short-answer questions (one to five words, as in the VQAv2/GQA part of LLaVA-1.5's mix) and
    15% a long detailed description, so most samples are short and a few are long. Each record's words are
    capped at `max_words` so nothing is truncated (both methods then train on exactly the same tokens)."""
    records = []
    for i in range(n):
        kind = rng.random()
        colour, place, shape = rng.choice(COLOURS), rng.choice(PLACES), rng.choice(SHAPES)
        facts = f"There is a {colour} {shape} on the {place}."
        turns: list[tuple[str, str]] = []
        if data_shape == "vqa":
            kind = max(kind, 0.12)  # no text-only records
            if rng.random() < 0.85:
                for _ in range(rng.choice((1, 1, 2, 3))):
                    turns.append((gen.question(5, 12), gen.sentence(1, 5)))
            else:
                turns.append((rng.choice(DETAIL_QUESTIONS), gen.answer(int(rng.gauss(220, 60)), lead=facts)))
        elif kind < 0.12:  # text-only, ShareGPT-like
            for _ in range(rng.choice((1, 1, 2, 2, 3))):
                turns.append((gen.question(6, 25), gen.answer(_lognormal(rng, 70, 0.8, 5, 400))))
        elif kind < 0.12 + 0.88 * 0.45:  # conversation: several short/medium question-answer rounds
            first = rng.choice((f"What colour is the {shape}?", f"Where is the {shape}?", gen.question()))
            turns.append((first, gen.answer(_lognormal(rng, 25, 0.7, 3, 150), lead=facts)))
            for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 4))):
                turns.append((gen.question(), gen.answer(_lognormal(rng, 30, 0.7, 3, 150))))
        elif kind < 0.12 + 0.88 * 0.60:  # detailed description
            n_words = int(min(250, max(40, rng.gauss(100, 30))))
            turns.append((rng.choice(DETAIL_QUESTIONS), gen.answer(n_words, lead=facts)))
        else:  # complex reasoning
            n_words = int(min(400, max(40, rng.gauss(140, 60))))
            turns.append((gen.question(10, 28), gen.answer(n_words, lead=facts)))
        kept, words = [], 0
        for q, a in turns:
            w = len(q.split()) + len(a.split())
            if kept and words + w > max_words:
                break
            if not kept and w > max_words:
                a = " ".join(a.split()[: max_words - len(q.split())])
            kept.append((q, a))
            words += w
        conv = []
        for q, a in kept:
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        record = {"id": f"{prefix}-{i}", "conversations": conv}
        if kind >= 0.12:
            record["image"] = f"{prefix}-{i:05d}.png"
            record["_draw"] = (colour, place, shape)
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
        records.append(record)
    return records


def write_data(
    root: Path, n_train: int, n_held: int, image_size: int, max_words: int, seed: int, data_shape: str = "instruct"
) -> dict:
    from lvit.demo.synthetic import draw

    rng = random.Random(seed)
    gen = TextGen(rng)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = {"images": images}
    for name, n in (("train", n_train), ("heldout", n_held)):
        records = make_records(n, rng, gen, name, max_words, data_shape)
        for r in records:
            drawn = r.pop("_draw", None)
            if drawn is not None:
                draw(*drawn, image_size, rng).save(images / r["image"])
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(records, indent=0))
    corpus_texts = [
        t["value"].replace("<image>\n", "") for r in json.loads(paths["train"].read_text()) for t in r["conversations"]
    ]
    return {**paths, "corpus": corpus_texts, "words": gen.words}


def to_trl_records(path: Path, image_folder: Path) -> tuple[list[list[dict]], list[list[str]]]:
    """LLaVA JSON -> TRL's conversational vision format: `messages` (string contents, no placeholder) and
    `images` (paths); TRL's collator puts the image before the first user text."""
    roles = {"human": "user", "gpt": "assistant"}
    messages, images = [], []
    for r in json.loads(Path(path).read_text()):
        messages.append(
            [{"role": roles[t["from"]], "content": t["value"].replace("<image>\n", "")} for t in r["conversations"]]
        )
        images.append([str(image_folder / r["image"])] if "image" in r else [])
    return messages, images


def trl_dataset(path: Path, image_folder: Path):
    import datasets

    messages, images = to_trl_records(path, image_folder)
    features = datasets.Features(
        {
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "images": datasets.List(datasets.Image()),
        }
    )
    return datasets.Dataset.from_dict({"messages": messages, "images": images}, features=features)


# ---------------------------------------------------------------------------------------------
# parts and the baseline's stock checkpoint


def build_parts(root: Path, corpus: list[str], words: list[str], gpu_layers: int | None) -> tuple[Path, Path]:
    """CLIP + Llama folders via `lvit.demo.tiny.build_tiny_parts`, with a BPE tokenizer of up to `vocab` tokens
    trained on the generated text (build_tiny_parts' own tokenizer has 400, too few for this text)."""
    import lvit.demo.tiny
    from lvit.templates.builtin import VICUNA_V1_SYSTEM

    shape = GPU_SHAPE if gpu_layers else CPU_SHAPE
    original = lvit.demo.tiny.build_tokenizer
    lvit.demo.tiny.build_tokenizer = functools.partial(original, vocab_size=shape["vocab"])
    extra = [VICUNA_V1_SYSTEM, *DETAIL_QUESTIONS]
    if gpu_layers:
        # Enough distinct strings for 32000 BPE merges (the text itself needs far fewer).
        rng = random.Random(1)
        extra += [
            " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(200))
            for _ in range(2000)
        ]
    text = {**shape["text"]}
    if gpu_layers:
        text["num_hidden_layers"] = gpu_layers
    try:
        if gpu_layers:
            return _build_gpu_parts(root, corpus + extra, shape["vision"], text)
        return lvit.demo.tiny.build_tiny_parts(root, corpus + extra + words, vision=shape["vision"], text=text)
    finally:
        lvit.demo.tiny.build_tokenizer = original


def _build_gpu_parts(root: Path, corpus: list[str], vision: dict, text: dict) -> tuple[Path, Path]:
    """UNTESTED on a GPU. The 7B-shaped LM is built directly in bf16 on the GPU (build_tiny_parts would build it
    in fp32 on the CPU), CLIP in bf16 on the CPU; the tokenizer is lvit.demo.tiny's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from lvit.demo.tiny import build_tokenizer

    vision_dir, lm_dir = root / "clip-vit-l14", root / "vicuna-7b-shape"
    torch.manual_seed(0)
    write_random_clip(vision_dir, {k: v for k, v in vision.items() if k != "projection_dim"})
    build_tokenizer(lm_dir, corpus)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    lm_config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **text
    )
    write_random_llama(lm_dir, lm_config, "cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return vision_dir, lm_dir


def model_section(vision_dir: Path, lm_dir: Path, gpu: bool) -> dict:
    return {
        "vision_tower": str(vision_dir),
        "language_model": str(lm_dir),
        "projector": "mlp2x_gelu",
        "vision_feature_layer": -2,
        "torch_dtype": "bfloat16" if gpu else "float32",
        **({"attn_implementation": "sdpa"} if gpu else {}),
    }


def write_stock_checkpoint(model_cfg: dict, out: Path, seed: int) -> None:
    """The stock LLaVA checkpoint the baseline starts from: exactly what lvit's run assembles (same parts,
    same seed, so the same projector initialisation), saved with `save_pretrained`."""
    import transformers

    from lvit.model.assemble import assemble
    from lvit.recipe.schema import ModelSection

    transformers.set_seed(seed)
    model, processor = assemble(ModelSection(**model_cfg), "train_throughput")
    model.save_pretrained(out)
    processor.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# measuring inside a run (child process)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Meter:
    """Counts what each training step receives and times the loop; installed by patching SFTTrainer."""

    def __init__(self):
        self.batches: list[tuple[int, int, int, int]] = []  # (samples, real tokens, padded positions, labels)
        self.step_ends: list[float] = []
        self.losses: list[float] = []
        self.t0 = self.cpu0 = None
        self.cpu1 = None
        self.data_s = 0.0
        self.collate_s = 0.0
        self.rss_reset = None
        self.peak_mem_gib = None
        self.load = []
        self.token = None  # lock-step: a socket to the driver, which hands out one step at a time
        self.step_s: list[float] = []  # lock-step: each step's time while holding the token
        self.step_cpu_s = 0.0
        self._go = self._go_cpu = None

    def wait_token(self) -> None:
        if self.token is not None and self._go is None:
            if self.token.recv(1) != b"G":
                raise SystemExit("lock-step driver went away")
            self._go, self._go_cpu = time.perf_counter(), _cpu_seconds()

    def install(self, token_fd: int | None = None) -> None:
        import torch
        import torch.utils.data._utils.fetch as fetch
        from transformers import TrainerCallback
        from trl import SFTTrainer

        meter = self
        cuda = torch.cuda.is_available()

        class Callback(TrainerCallback):
            def __init__(self, trainer):
                self.trainer = trainer

            def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
                meter.load.append(os.getloadavg()[0])
                _warm_up(self.trainer, model, train_dataloader)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    meter.rss_reset = reset_peak_rss()
                meter.data_s = meter.collate_s = 0.0
                meter.cpu0 = _cpu_seconds()
                meter.t0 = time.perf_counter()
                if meter.token is not None:
                    meter.token.sendall(f"R{state.max_steps}\n".encode())

            def on_step_end(self, args, state, control, **kwargs):
                if cuda:
                    torch.cuda.synchronize()
                meter.step_ends.append(time.perf_counter())
                meter.cpu1 = _cpu_seconds()
                if meter.token is not None:
                    meter.step_s.append(meter.step_ends[-1] - meter._go)
                    meter.step_cpu_s += meter.cpu1 - meter._go_cpu
                    meter._go = None
                    meter.token.sendall(b"D")

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs and "train_runtime" not in logs:
                    meter.losses.append(float(logs["loss"]))

            def on_train_end(self, args, state, control, **kwargs):
                if meter.token is not None and meter.token.recv(1) != b"E":
                    raise SystemExit("lock-step driver went away")  # saving and evaluating wait for the others
                meter.load.append(os.getloadavg()[0])
                if cuda:
                    meter.peak_mem_gib = torch.cuda.max_memory_allocated() / GIB
                else:
                    meter.peak_mem_gib = proc_status_gib("VmHWM")

        original_init = SFTTrainer.__init__

        def init(trainer, *args, **kwargs):
            original_init(trainer, *args, **kwargs)
            trainer.add_callback(Callback(trainer))

        SFTTrainer.__init__ = init

        original_step = SFTTrainer.training_step

        def training_step(trainer, model, inputs, *args, **kwargs):
            labels = inputs["labels"]
            if "row_lengths" in inputs:  # lvit's packed rows: samples start at position 0 within each row's length
                pos, lengths = inputs["position_ids"], inputs["row_lengths"]
                real_part = torch.arange(pos.shape[1], device=pos.device)[None] < lengths[:, None]
                samples, real = int(((pos == 0) & real_part).sum()), int(lengths.sum())
            else:
                samples, real = inputs["attention_mask"].shape[0], int(inputs["attention_mask"].sum())
            meter.batches.append((samples, real, labels.numel(), int((labels != -100).sum())))
            return original_step(trainer, model, inputs, *args, **kwargs)

        SFTTrainer.training_step = training_step

        if token_fd is not None:
            import socket

            self.token = socket.socket(fileno=token_fd)
            from lvit.train.trainer import LlavaTrainer  # it fetches its batches itself (lvit.train.trainer)

            for cls in (SFTTrainer, LlavaTrainer):
                original_batches = cls.get_batch_samples

                def get_batch_samples(trainer, *args, _original=original_batches, **kwargs):
                    meter.wait_token()  # the step's data fetch (and accelerate's prefetch of the next batch) is timed
                    return _original(trainer, *args, **kwargs)

                cls.get_batch_samples = get_batch_samples

        original_fetch = fetch._MapDatasetFetcher.fetch

        def timed_fetch(fetcher, index):
            start = time.perf_counter()
            try:
                return original_fetch(fetcher, index)
            finally:
                meter.data_s += time.perf_counter() - start

        fetch._MapDatasetFetcher.fetch = timed_fetch

        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

        from lvit.data.collator import LlavaCollator

        for cls, name in ((DataCollatorForVisionLanguageModeling, "torch_call"), (LlavaCollator, "__call__")):
            setattr(cls, name, self._timed(getattr(cls, name)))

    def _timed(self, fn):
        meter = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                meter.collate_s += time.perf_counter() - start

        return wrapper

    def summary(self) -> dict:
        samples, real, padded, labelled = (sum(b[i] for b in self.batches) for i in range(4))
        if self.token is not None:
            seconds, cpu = sum(self.step_s), self.step_cpu_s
        else:
            seconds, cpu = self.step_ends[-1] - self.t0, self.cpu1 - self.cpu0
        return {
            "schedule": "lockstep" if self.token is not None else "sequential",
            "steps": len(self.step_ends),
            "samples": samples,
            "real_tokens": real,
            "padded_positions": padded,
            "label_tokens": labelled,
            "seconds": seconds,
            "samples_per_s": samples / seconds,
            "tokens_per_s": real / seconds,
            "padding_fraction": 1 - real / padded,
            "cpu_s": cpu,
            "samples_per_cpu_s": samples / cpu,
            "step_s": self.step_s,
            "data_s": self.data_s,
            "collate_s": self.collate_s,
            "peak_mem_gib": self.peak_mem_gib,
            "peak_rss_reset": self.rss_reset,
            "mean_train_loss": statistics.fmean(self.losses) if self.losses else None,
            "losses": self.losses,
            "loadavg_start_end": self.load,
        }


def _warm_up(trainer, model, dataloader) -> None:
    """One forward+backward on two records through the fused head, gradients dropped, before timing."""
    import torch

    batch = dataloader.collate_fn([dataloader.dataset[i] for i in range(2)])
    batch = trainer._prepare_inputs(batch)
    with trainer.autocast_smart_context_manager():
        out = model(**batch, fused_lm_head=True, use_cache=False)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def training_section(spec: dict) -> dict:
    gpu = spec["gpu"]
    return {
        "output_dir": spec["out"],
        "per_device_train_batch_size": spec["batch"],
        "num_train_epochs": 1,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": spec["seed"],
        "activation_checkpointing": gpu,
        "dataloader_num_workers": spec.get("workers", 0),
        **({"bf16": True, "tf32": True} if gpu else {"bf16": False, "use_cpu": True}),
    }


def run_baseline(spec: dict) -> dict:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    ckpt = spec["checkpoint"]
    processor = AutoProcessor.from_pretrained(ckpt)
    processor.chat_template = VICUNA_V1_GENERATION_TEMPLATE
    dtype = torch.bfloat16 if spec["gpu"] else torch.float32
    extra = {"attn_implementation": "sdpa"} if spec["gpu"] else {}
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, **extra)
    model.model.vision_tower.requires_grad_(False)  # stage 2: CLIP frozen; projector and LM train
    dataset = trl_dataset(Path(spec["data"]), Path(spec["images"]))
    args = SFTConfig(
        **training_section(spec),
        gradient_accumulation_steps=1,
        max_length=spec["max_length"],
        assistant_only_loss=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    result = trainer.train()
    trainer.save_model(spec["out"])
    return result.metrics


def run_lvit(spec: dict) -> dict:
    from lvit.recipe.load import recipe_from_dict
    from lvit.train.run import run

    training = training_section(spec)
    if spec.get("sampling"):
        training["train_sampling_strategy"] = spec["sampling"]
    packing = {"packing": spec.get("packing", True)}
    if spec.get("row_budget"):
        budget = spec["row_budget"]
        packing["max_tokens_per_row"] = spec["max_length"] if budget == "max_length" else budget
    model = dict(spec["model"])
    if spec.get("attn"):
        model["attn_implementation"] = spec["attn"]
    if spec.get("masked_rows"):  # lvit before its packed sdpa: sdpa's block mask, rows of max_length
        import lvit.train.build

        lvit.train.build.use_packed_sdpa = lambda model, max_length: "the masked_rows lever"
        packing["max_tokens_per_row"] = spec["max_length"]
    raw = {
        "stage": "finetune",
        "method": "full",
        "model": model,
        "data": {
            "path": spec["data"],
            "image_folder": spec["images"],
            "template": "vicuna_v1",
            "max_length": spec["max_length"],
            **packing,
        },
        "compact_head": spec.get("compact_head", True),
        "global_batch_size": spec["batch"],
        "training": training,
    }
    out = run(recipe_from_dict(raw, "train_throughput"))
    return json.loads((out / "lvit_run.json").read_text())["metrics"]


def vicuna_encoder(checkpoint: str):
    """`(processor, encoder)`: a stock LLaVA folder's processor and lvit's vicuna_v1 encoder for its tokenizer."""
    from transformers import AutoConfig, AutoProcessor

    from lvit.model.towers import num_image_tokens
    from lvit.templates.encoder import ConversationEncoder

    processor = AutoProcessor.from_pretrained(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    encoder = ConversationEncoder(
        "vicuna_v1", processor.tokenizer, config.image_token_id, num_image_tokens(config.vision_config)
    )
    return processor, encoder


def heldout_batches(spec: dict, processor_dir: str, batch: int = 8):
    """The held-out records as lvit builds them: vicuna_v1 ids, labels on each answer and its EOS."""
    from lvit.data.collator import LlavaCollator
    from lvit.data.dataset import prepare
    from lvit.data.images import ImageLoader
    from lvit.recipe.schema import DataSection

    processor, encoder = vicuna_encoder(processor_dir)
    data = DataSection(path=spec["heldout"], image_folder=spec["images"], max_length=spec["max_length"])
    dataset = prepare(data, encoder, "heldout").dataset
    collator = LlavaCollator(
        encoder,
        ImageLoader(processor.image_processor, spec["images"]),
        processor.tokenizer.pad_token_id,
        data.max_length,
    )
    rows = [dataset[i] for i in range(len(dataset))]
    return [collator(rows[i : i + batch]) for i in range(0, len(rows), batch)], encoder, rows


def heldout_loss(model_dir: str, spec: dict) -> dict:
    """Mean NLL over the held-out assistant tokens (+ EOS), full logits, no fused head."""
    import torch
    from transformers import LlavaForConditionalGeneration

    gpu = spec["gpu"]
    device = "cuda" if gpu else "cpu"
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32).to(
        device
    )
    model.eval()
    batches, _, _ = heldout_batches(spec, spec["checkpoint"])
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            labels = b.pop("labels")
            logits = model(**b).logits[:, :-1].float()
            target = labels[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            count += int((target != -100).sum())
    return {"heldout_loss": total / count, "heldout_tokens": count}


def lm_flop_params(model_dir: str) -> int:
    """P for MFU: LM parameters without the input embedding (the lookup does no matmul), plus the projector."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    lm = model.model.language_model
    n = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    n += sum(p.numel() for p in model.lm_head.parameters())
    n += sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    return n


def child(spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    meter = Meter()
    meter.install(token_fd=spec.get("token_fd"))
    started = time.perf_counter()
    metrics = run_baseline(spec) if spec["method"] == "baseline" else run_lvit(spec)
    result = {"spec": spec, "trainer_metrics": metrics, "torch_threads": torch.get_num_threads(), **meter.summary()}
    result.update(heldout_loss(spec["out"], spec))
    result["child_wall_s"] = time.perf_counter() - started
    shutil.rmtree(spec["out"], ignore_errors=True)  # weights: not needed after the held-out loss
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------
# setup checks (parent)


def check_labels(spec: dict) -> dict:
    """Do TRL's collator (with the generation template) and lvit's encoder train on the same tokens?"""
    from transformers import AutoProcessor
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    batches, _, rows = heldout_batches(
        spec, spec["checkpoint"], batch=len(json.loads(Path(spec["heldout"]).read_text()))
    )
    lvit_batch = batches[0]
    processor = AutoProcessor.from_pretrained(spec["checkpoint"])
    processor.chat_template = VICUNA_V1_GENERATION_TEMPLATE
    collator = DataCollatorForVisionLanguageModeling(
        processor=processor, max_length=spec["max_length"], assistant_only_loss=True
    )
    dataset = trl_dataset(Path(spec["heldout"]), Path(spec["images"]))
    trl_batch = collator([dataset[i] for i in range(len(dataset))])
    same, trained = 0, [0, 0]
    real = [int(trl_batch["attention_mask"].sum()), int(lvit_batch["attention_mask"].sum())]
    for i in range(len(rows)):
        a = trl_batch["input_ids"][i][trl_batch["labels"][i] != -100].tolist()
        b = lvit_batch["input_ids"][i][lvit_batch["labels"][i] != -100].tolist()
        same += a == b
        trained[0] += len(a)
        trained[1] += len(b)
    return {
        "records": len(rows),
        "same_trained_tokens": same,
        "trained_tokens_trl_lvit": trained,
        "real_tokens_trl_lvit": real,
    }


def fp32_cpu_peak_tflops(threads: int | None) -> float:
    """The CPU's fp32 matmul rate (2048^3 `torch.mm`, best of 5) at the runs' thread count."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    torch.set_num_threads(before)
    return 2 * n**3 / best / 1e12


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bf16_peak_tflops() -> float:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    iters = 50
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def machine() -> dict:
    import torch

    info = {"nproc": os.cpu_count(), "cpu": cpu_model(), **package_versions(("torch", "transformers", "trl"))}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------
# driver (parent)


CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def _prepare_child(spec: dict, work: Path) -> tuple[list[str], Path]:
    name = f"{spec['label']}-r{spec['round']}"
    spec_path = work / f"spec-{name}.json"
    spec["result"] = str(work / f"result-{name}.json")
    spec_path.write_text(json.dumps(spec))
    return [sys.executable, __file__, "--child", str(spec_path)], work / f"log-{name}.txt"


def _finish_child(spec: dict, rc: int, log_path: Path, wall: float, log) -> dict:
    if rc != 0:
        sys.exit(f"run {spec['label']} (round {spec['round']}) failed; see {log_path}:\n{log_path.read_text()[-3000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    result["process_wall_s"] = wall
    log(
        f"  r{spec['round']} {spec['label']:<13} {result['samples_per_s']:7.3f} samples/s  "
        f"{result['tokens_per_s']:8.1f} tok/s  padding {result['padding_fraction']:6.1%}  "
        f"{result['seconds']:6.1f} s timed / {result['process_wall_s']:5.1f} s process  "
        f"loss {result['mean_train_loss']:.4f}  held-out {result['heldout_loss']:.4f}  "
        f"mem {result['peak_mem_gib']:.2f} GiB  load {[round(x, 2) for x in result['loadavg_start_end']]}"
    )
    return result


def run_sequential(spec: dict, work: Path, log) -> dict:
    """One run on its own (the GPU schedule, and `--schedule sequential`)."""
    cmd, log_path = _prepare_child(spec, work)
    start = time.perf_counter()
    with log_path.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=f, env={**os.environ, **CHILD_ENV}).returncode
    return _finish_child(spec, rc, log_path, time.perf_counter() - start, log)


def run_lockstep(specs: list[dict], work: Path, log) -> list[dict]:
    """Several runs started together that take turns, one optimizer step each (A B C A B C ...).

    Each child waits for the token before fetching its step's batch and gives it back after the optimizer
    step, so only one trains at any moment. Its timed seconds are the sum of its own steps. Consecutive
    steps of the methods are seconds apart, so a shared machine's changing load falls on all of them
    alike, which alternating whole runs of minutes does not achieve. Set-up, warm-up and the held-out
    evaluation run concurrently and are not timed.
    """
    import socket

    procs, socks, logs, starts = [], [], [], []
    try:
        for spec in specs:
            ours, theirs = socket.socketpair()
            spec["token_fd"] = theirs.fileno()
            cmd, log_path = _prepare_child(spec, work)
            f = log_path.open("w")
            starts.append(time.perf_counter())
            procs.append(
                subprocess.Popen(cmd, stdout=f, stderr=f, env={**os.environ, **CHILD_ENV}, pass_fds=(theirs.fileno(),))
            )
            f.close()
            theirs.close()
            socks.append(ours)
            logs.append(log_path)
        remaining = []
        for spec, sock, proc, log_path in zip(specs, socks, procs, logs, strict=True):
            line = sock.makefile("rb").readline()
            if not line.startswith(b"R"):
                proc.wait()
                _finish_child(spec, proc.returncode or 1, log_path, 0.0, log)
            remaining.append(int(line[1:]))
        while any(remaining):
            for i, sock in enumerate(socks):
                if remaining[i]:
                    sock.sendall(b"G")
                    if sock.recv(1) != b"D":
                        procs[i].wait()
                        _finish_child(specs[i], procs[i].returncode or 1, logs[i], 0.0, log)
                    remaining[i] -= 1
        for sock in socks:
            sock.sendall(b"E")
        results = []
        for spec, proc, log_path, start in zip(specs, procs, logs, starts, strict=True):
            rc = proc.wait()
            results.append(_finish_child(spec, rc, log_path, time.perf_counter() - start, log))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for sock in socks:
            sock.close()


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def summarize(results: list[dict], mfu: dict | None) -> dict:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["spec"]["label"], []).append(r)
    methods = {}
    for label, runs in by.items():
        s = sum(r["samples"] for r in runs)
        t = sum(r["seconds"] for r in runs)
        methods[label] = {
            "runs": len(runs),
            "samples_per_s": s / t,
            "tokens_per_s": sum(r["real_tokens"] for r in runs) / t,
            "samples_per_cpu_s": s / sum(r["cpu_s"] for r in runs),
            "padding_fraction": 1 - sum(r["real_tokens"] for r in runs) / sum(r["padded_positions"] for r in runs),
            "peak_mem_gib": max(r["peak_mem_gib"] or 0 for r in runs),
            "mean_train_loss": statistics.fmean(r["mean_train_loss"] for r in runs),
            "heldout_loss": statistics.fmean(r["heldout_loss"] for r in runs),
            "data_s_per_step": sum(r["data_s"] for r in runs) / sum(r["steps"] for r in runs),
            "collate_s_per_step": sum(r["collate_s"] for r in runs) / sum(r["steps"] for r in runs),
            "seconds_per_step": t / sum(r["steps"] for r in runs),
        }
        if mfu:
            tflops = 6 * mfu["params"] * sum(r["real_tokens"] for r in runs) / t / 1e12
            methods[label]["model_tflops"] = tflops
            methods[label]["mfu"] = tflops / mfu["peak_tflops"]
    rounds = {}
    for r in results:
        rounds.setdefault(r["spec"]["round"], {})[r["spec"]["label"]] = r
    ratio_rounds = [
        rd["lvit"]["samples_per_s"] / rd["baseline"]["samples_per_s"]
        for rd in rounds.values()
        if "lvit" in rd and "baseline" in rd
    ]
    levers = {}
    for lever in LEVERS:
        pairs = [(rd["lvit"], rd[lever]) for rd in rounds.values() if lever in rd and "lvit" in rd]
        if pairs:
            levers[lever] = {
                "lvit_default_over_lever_samples_per_s": geomean(
                    [a["samples_per_s"] / b["samples_per_s"] for a, b in pairs]
                ),
                "lever_over_lvit_default_samples_per_s": geomean(
                    [b["samples_per_s"] / a["samples_per_s"] for a, b in pairs]
                ),
                "lever_over_lvit_default_samples_per_cpu_s": geomean(
                    [b["samples_per_cpu_s"] / a["samples_per_cpu_s"] for a, b in pairs]
                ),
                "rounds": len(pairs),
            }
            with_plain = [rd for rd in rounds.values() if lever in rd and "plain" in rd and lever != "plain"]
            if with_plain:
                levers[lever]["lever_over_plain_samples_per_s"] = geomean(
                    [rd[lever]["samples_per_s"] / rd["plain"]["samples_per_s"] for rd in with_plain]
                )
            with_base = [rd for rd in rounds.values() if lever in rd and "baseline" in rd]
            if with_base:
                levers[lever]["lever_over_baseline_samples_per_s"] = geomean(
                    [rd[lever]["samples_per_s"] / rd["baseline"]["samples_per_s"] for rd in with_base]
                )
    out = {"methods": methods, "ratio_rounds": ratio_rounds, "levers": levers}
    if ratio_rounds:
        b, lv = methods["baseline"], methods["lvit"]
        out["ratio"] = geomean(ratio_rounds)
        out["ratio_tokens_per_s"] = lv["tokens_per_s"] / b["tokens_per_s"]
        out["ratio_samples_per_cpu_s"] = lv["samples_per_cpu_s"] / b["samples_per_cpu_s"]
        out["train_loss_rel_diff"] = (lv["mean_train_loss"] - b["mean_train_loss"]) / b["mean_train_loss"]
        out["heldout_loss_rel_diff"] = (lv["heldout_loss"] - b["heldout_loss"]) / b["heldout_loss"]
        out["goal_1_6x"] = out["ratio"] >= 1.6
        out["goal_padding_under_1pct"] = lv["padding_fraction"] < 0.01
        out["goal_padding_under_3pct"] = lv["padding_fraction"] < 0.03
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--records", type=int, help="training records, one epoch (default: CPU 128, GPU 512)")
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--batch", type=int, help="per-device batch = global batch (default: CPU 4, GPU 8)")
    parser.add_argument("--lr", type=float, help="learning rate (default: CPU 1e-3, GPU 2e-5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of baseline + lvit (+ levers)")
    parser.add_argument("--levers", help=f"comma list of {LEVERS}, or 'none' (default: CPU {CPU_LEVERS}; GPU plain)")
    parser.add_argument(
        "--data-shape",
        choices=DATA_SHAPES,
        default="instruct",
        help="instruct: LLaVA-Instruct-158K-like lengths; vqa: mostly one-line answers, a tail of long descriptions",
    )
    parser.add_argument("--lever-rounds", type=int, default=1, help="rounds in which the lever runs are made")
    parser.add_argument(
        "--max-length",
        type=int,
        help="data.max_length / SFTConfig.max_length (default: CPU 1024, GPU 2048); the data stays the same",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--schedule",
        choices=("lockstep", "sequential"),
        help="lockstep: a round's runs take turns step by step (default on the CPU); sequential: one run after "
        "the other (default on a GPU, where two models may not fit)",
    )
    parser.add_argument("--gpu-7b-layers", type=int, default=None, help="UNTESTED: GPU run, Vicuna-7B shape, N layers")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    gpu = args.gpu_7b_layers is not None
    chosen = args.levers or (CPU_LEVERS if not gpu else "plain")
    levers = [] if chosen == "none" else [x for x in chosen.split(",") if x]
    unknown = set(levers) - set(LEVERS)
    if unknown:
        parser.error(f"unknown levers {sorted(unknown)}; known: {LEVERS}")
    shape = GPU_SHAPE if gpu else CPU_SHAPE
    records = args.records or (512 if gpu else 128)
    batch = args.batch or (8 if gpu else 4)
    lr = args.lr or (2e-5 if gpu else 1e-3)
    schedule = args.schedule or ("sequential" if gpu else "lockstep")
    began = time.perf_counter()
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="lvit-throughput-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        info = machine()
        load_start = os.getloadavg()
        log(f"{stamp}  {info}  load {os.getloadavg()}")
        image_size = shape["vision"]["image_size"]
        # max_words keeps every sample under the shape's max_length (about 1.25 tokens per word, plus image and
        # prompt); --max-length changes only the recipe's, so the data is the same at 1024 and 2048
        max_words = int((shape["max_length"] - (image_size // shape["vision"]["patch_size"]) ** 2 - 80) / 1.5)
        max_length = args.max_length or shape["max_length"]
        data = write_data(work / "data", records, args.held_out, image_size, max_words, args.seed, args.data_shape)
        vision_dir, lm_dir = build_parts(work / "parts", data["corpus"], data["words"], args.gpu_7b_layers)
        model_cfg = model_section(vision_dir, lm_dir, gpu)
        ckpt = work / "stock-llava"
        write_stock_checkpoint(model_cfg, ckpt, args.seed)
        base = {
            "gpu": gpu,
            "checkpoint": str(ckpt),
            "model": model_cfg,
            "data": str(data["train"]),
            "heldout": str(data["heldout"]),
            "images": str(data["images"]),
            "batch": batch,
            "lr": lr,
            "seed": args.seed,
            "max_length": max_length,
            "max_words": max_words,
            "data_shape": args.data_shape,
            "schedule": schedule,
            "threads": args.threads,
        }
        labels = check_labels(base)
        log(f"trained tokens, TRL collator vs lvit encoder, on the held-out records: {labels}")
        initial = heldout_loss(str(ckpt), base)
        log(f"held-out loss before training: {initial['heldout_loss']:.4f} over {initial['heldout_tokens']} tokens")
        lengths = _length_stats(base)
        log(f"training data (tokens per sample, image tokens included): {lengths}")
        full_scale = simulated_padding(base, batch)
        log(f"padding at full-dataset scale, samplers only (no training): {full_scale}")
        if gpu:
            mfu = {"peak_tflops": bf16_peak_tflops(), "params": lm_flop_params(str(ckpt))}
            log(f"bf16 peak {mfu['peak_tflops']:.0f} TFLOPS (8192^3 matmul); P = {mfu['params'] / 1e9:.3f}B")
        else:
            mfu = {"peak_tflops": fp32_cpu_peak_tflops(args.threads), "params": lm_flop_params(str(ckpt))}
            log(f"fp32 peak {mfu['peak_tflops'] * 1e3:.1f} GFLOP/s (2048^3 matmul); P = {mfu['params'] / 1e6:.2f}M")

        results = []
        for rnd in range(1, args.rounds + 1):
            plan = [("baseline", {}), ("lvit", {})]
            if rnd <= args.lever_rounds:
                plan += [(lever, LEVER_CHANGES[lever]) for lever in levers]
            specs = [
                {
                    **base,
                    **change,
                    "label": label,
                    "round": rnd,
                    "method": "baseline" if label == "baseline" else "lvit",
                    "out": str(work / f"run-{label}-r{rnd}"),
                }
                for label, change in plan
            ]
            if schedule == "lockstep":
                results += run_lockstep(specs, work, log)
            else:
                results += [run_sequential(spec, work, log) for spec in specs]
        summary = summarize(results, mfu)
        wall = time.perf_counter() - began
        report = {
            "date": stamp,
            "machine": info,
            "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
            "shape": shape
            if not gpu
            else {**shape, "text": {**shape["text"], "num_hidden_layers": args.gpu_7b_layers}},
            "settings": {k: v for k, v in base.items() if k not in ("checkpoint", "data", "heldout", "images")},
            "records": records,
            "data_lengths": lengths,
            "full_scale_padding_simulated": full_scale,
            "label_check": labels,
            "initial_heldout": initial,
            "mfu": mfu,
            "summary": summary,
            "runs": results,
            "wall_s": wall,
            "loadavg": [load_start, os.getloadavg()],
        }
        print_summary(report, log)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
            log(f"figures written to {args.json}")
    finally:
        if tmp is not None:
            tmp.cleanup()


def _length_stats(spec: dict) -> dict:
    """Token lengths of the training samples as lvit measures them (image tokens included)."""
    from lvit.data.dataset import prepare
    from lvit.recipe.schema import DataSection

    processor, encoder = vicuna_encoder(spec["checkpoint"])
    ds = prepare(
        DataSection(path=spec["data"], image_folder=spec["images"], max_length=spec["max_length"]), encoder
    ).dataset
    lengths = sorted(ds["length"])
    q = lambda f: lengths[min(len(lengths) - 1, int(f * len(lengths)))]  # noqa: E731
    return {
        "records": len(lengths),
        "text_only": sum(p is None for p in ds["image_path"]),
        "vocab": len(processor.tokenizer),
        "image_tokens": encoder.num_image_tokens,
        "mean": round(statistics.fmean(lengths), 1),
        "min": lengths[0],
        "p10": q(0.1),
        "median": q(0.5),
        "p90": q(0.9),
        "max": lengths[-1],
    }


def simulated_padding(spec: dict, batch: int, n: int = 4000) -> dict:
    """Padding at full-dataset scale, from the samplers alone (no training): `n` fresh records from the same
    generator, measured with lvit's encoder, batched at random and by transformers' length grouping. With
    `n` >= 200 x batch the grouping uses its full 50-batch megabatches, as on LLaVA-Instruct-158K; the timed
    runs use a few hundred records, where transformers shrinks the megabatch to a quarter of the dataset."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from lvit.templates.conversation import Conversation

    _, encoder = vicuna_encoder(spec["checkpoint"])
    gen = TextGen(random.Random(spec["seed"]))  # the training data's vocabulary
    records = make_records(n, random.Random(spec["seed"] + 1000), gen, "sim", spec["max_words"], spec["data_shape"])
    roles = {"human": "user", "gpt": "assistant"}
    convs = [
        Conversation(
            [(roles[t["from"]], t["value"].replace("<image>\n", "")) for t in r["conversations"]],
            has_image="image" in r,
        )
        for r in records
    ]
    lengths = [min(len(e.input_ids), spec["max_length"]) for e in encoder.encode_many(convs)]

    def padding(order: list[int]) -> tuple[float, float]:
        real = padded = 0
        usable = len(order) - len(order) % batch
        for i in range(0, usable, batch):
            b = [lengths[j] for j in order[i : i + batch]]
            real += sum(b)
            padded += max(b) * len(b)
        return 1 - real / padded, padded / usable

    def packed(order: list[int], budget) -> tuple[float, float]:
        from lvit.data.packing import rows

        real = positions = 0
        usable = len(order) - len(order) % batch
        for i in range(0, usable, batch):
            b = [lengths[j] for j in order[i : i + batch]]
            layout = rows(b, budget)
            real += sum(b)
            positions += len(layout) * max(sum(b[k] for k in row) for row in layout)
        return 1 - real / positions, positions / usable

    seeds = range(5)
    rand = [padding(torch.randperm(n, generator=torch.Generator().manual_seed(s)).tolist()) for s in seeds]
    pack = [
        packed(torch.randperm(n, generator=torch.Generator().manual_seed(s)).tolist(), spec["max_length"])
        for s in seeds
    ]
    longest = [packed(torch.randperm(n, generator=torch.Generator().manual_seed(s)).tolist(), "longest") for s in seeds]
    grouped = [
        padding(get_length_grouped_indices(lengths, batch, generator=torch.Generator().manual_seed(s))) for s in seeds
    ]
    return {
        "records": n,
        "batch": batch,
        "real_tokens_per_sample": statistics.fmean(lengths),
        "random_padding": statistics.fmean(x[0] for x in rand),
        "random_packed_padding": statistics.fmean(x[0] for x in pack),
        "random_packed_positions_per_sample": statistics.fmean(x[1] for x in pack),
        "random_packed_longest_rows_padding": statistics.fmean(x[0] for x in longest),
        "grouped_padding": statistics.fmean(x[0] for x in grouped),
        "random_positions_per_sample": statistics.fmean(x[1] for x in rand),
        "grouped_positions_per_sample": statistics.fmean(x[1] for x in grouped),
    }


def print_summary(report: dict, log) -> None:
    s = report["summary"]
    log("")
    log(
        f"{'method':<13} {'samples/s':>10} {'tokens/s':>9} {'samp/cpu-s':>10} {'padding':>8} {'s/step':>7} "
        f"{'data s/step':>11} {'collate':>8} {'peak GiB':>8} {'train loss':>12} {'held-out':>10}"
        + ("  of peak" if report["mfu"] else "")
    )
    for label, m in s["methods"].items():
        log(
            f"{label:<13} {m['samples_per_s']:10.3f} {m['tokens_per_s']:9.1f} {m['samples_per_cpu_s']:10.3f} "
            f"{m['padding_fraction']:8.1%} {m['seconds_per_step']:7.2f} {m['data_s_per_step']:11.3f} "
            f"{m['collate_s_per_step']:8.3f} {m['peak_mem_gib']:8.2f} {m['mean_train_loss']:12.8f} "
            f"{m['heldout_loss']:10.7f}" + (f"  {m['mfu']:.1%}" if "mfu" in m else "")
        )
    if "ratio" in s:
        per_round = ", ".join(f"{x:.2f}" for x in s["ratio_rounds"])
        log(
            f"\nlvit / baseline samples/s: {s['ratio']:.2f}x (rounds: {per_round}); "
            f"tokens/s {s['ratio_tokens_per_s']:.2f}x; samples per CPU-second {s['ratio_samples_per_cpu_s']:.2f}x"
        )
        log(
            f"mean training loss: relative difference {s['train_loss_rel_diff']:+.2%}; held-out loss "
            f"{s['heldout_loss_rel_diff']:+.2%} (before training {report['initial_heldout']['heldout_loss']:.4f})"
        )
        log(f"goal >= 1.6x: {s['goal_1_6x']}; lvit padding < 1%: {s['goal_padding_under_1pct']}")
    for lever, v in s["levers"].items():
        log(
            f"lever {lever}: lever / lvit default samples/s {v['lever_over_lvit_default_samples_per_s']:.2f}x, "
            f"per CPU-second {v['lever_over_lvit_default_samples_per_cpu_s']:.2f}x"
            + (
                f"; lever / baseline {v['lever_over_baseline_samples_per_s']:.2f}x"
                if "lever_over_baseline_samples_per_s" in v
                else ""
            )
            + (
                f"; lever / plain {v['lever_over_plain_samples_per_s']:.2f}x"
                if "lever_over_plain_samples_per_s" in v
                else ""
            )
            + f" ({v['rounds']} round(s))"
        )
    f = report["full_scale_padding_simulated"]
    log(
        f"padding at full-dataset scale ({f['records']} records, batch {f['batch']}, samplers only): random "
        f"{f['random_padding']:.1%}, length-grouped {f['grouped_padding']:.1%}, random + packed in rows of at most "
        f"max_length {f['random_packed_padding']:.1%}, of the longest sample (eager's default) "
        f"{f['random_packed_longest_rows_padding']:.1%}, in one row (sdpa's and flash's default) 0%; positions per "
        "sample "
        f"{f['random_positions_per_sample']:.0f} vs {f['grouped_positions_per_sample']:.0f} "
        f"({f['random_positions_per_sample'] / f['grouped_positions_per_sample']:.2f}x)"
    )
    log(f"whole benchmark: {report['wall_s'] / 60:.1f} min; load average at start / end {report['loadavg']}")


if __name__ == "__main__":
    main()
