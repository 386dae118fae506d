"""Peak memory and speed of ONE QLoRA stage-2 training step on a Vicuna-13B-shaped LLaVA model.

What it measures
    One training step of `recipes/llava_stage2_qlora.yaml` (forward + backward + optimizer step) at batch 1
    and sequence length 2048 (BOS + 256 image tokens + random text), with activation checkpointing, on a
    language model of Vicuna-13B's shape (or 7B's) and a CLIP ViT-L/14 (224 px) vision tower, both with
    random weights (no download). It reports peak GPU memory (`torch.cuda.max_memory_allocated` /
    `max_memory_reserved`, plus what the device uses outside PyTorch's allocator: the CUDA context and
    the paged optimizer's 8-bit states, which bitsandbytes keeps in CUDA managed memory), tokens/s (all
    `seq_len` tokens, image tokens included, per step time) and step time, and whether the 16 GiB goal
    holds: peak reserved (loading, warm-up step or timed steps) + memory outside the allocator <= 16 GiB.

    python benchmarks/qlora_memory.py --shape 13b --json 13b.json        # on a GPU
    python benchmarks/qlora_memory.py --shape 7b  --json 7b.json
    python benchmarks/qlora_memory.py                                      # no GPU: scaled-down CPU run
    python benchmarks/qlora_memory.py --shape 13b --estimate-only          # the analytic estimate only

The code path is lvit's, as far as a benchmark can follow it
    1. The random parts are written as ordinary Hugging Face folders with `save_pretrained` (CLIP vision
       model + image processor; Llama LM in bf16 safetensors shards + a 32000-token tokenizer), in a
       child process, so the measuring process never held the 16-bit LM.
    2. `lvit.model.assemble.assemble(ModelSection(...), quantize_lm=True, compute_dtype=...)`: the real loading,
       i.e. `lvit.model.quant.load_lm_4bit` (NF4, double quantization, LM head kept 16-bit, bnb quantizing
       while `from_pretrained` streams the shards), tokenizer growth (+<image>, +<pad>), projector.
    3. `lvit.model.stages.apply_stage(model, "finetune", projector, train_lm=False)`,
       `lvit.model.adapters.add_lora(model, recipe.lora, projector)` with the recipe's r / alpha / dropout, and
       `lvit.train.precision.upcast_trainable(model)` (fp32 masters: the projector's trainable copy in fp32).
    4. What `lvit.train.trainer.LlavaTrainer` (TRL `SFTTrainer` on transformers `Trainer`) then does, mirrored
       by hand: move the model to the device (the assembled LLaVA model is not flagged as quantized, so
       Trainer calls `.to(device)`; CLIP and the projector were loaded on the CPU), activation
       checkpointing with `use_reentrant=False` and `enable_input_require_grads()`, TRL's bf16 cast of
       the trainable parameters only if the model is flagged `is_loaded_in_4bit` (it is not: the LoRA
       weights stay fp32, as peft makes them), TRL's fused LM head (loss without the full
       2048 x 32002 logits; `--full-logits` to compare), bf16 autocast (`bf16: true`), TF32, and
       bitsandbytes `PagedAdamW8bit` with the projector in its own group at `projector_lr`.

Why save and reload the 13B LM instead of building it quantized in memory
    Building `Linear4bit` layers directly would skip exactly the code the benchmark is for (lvit's
    `load_lm_4bit`, the skip list that keeps the LM head 16-bit, transformers' quantize-on-load). The
    cost is disk and time: the bf16 13B shards are 26 GB (7B: 13.5 GB), within the 64 GiB of the GPU
    machines used here. The LM is initialised directly in bf16 on the GPU when it fits there (seconds;
    otherwise on the CPU, minutes) and written with `max_shard_size="5GB"`; writing and quantize-loading
    should take a few minutes together on an H100 machine (expected, not yet timed: disk dependent).
    `--parts-dir DIR` keeps the written parts and reuses them on later runs.

Without CUDA
    The script runs a scaled-down shape (`tiny-cpu`: 4 layers x 512 hidden x 1376 intermediate, a 4-layer
    256-wide CLIP that still yields 256 image tokens, sequence 512) through the same code path on the
    CPU and reports peak RSS (getrusage; the training-step peak via /proc VmHWM, reset before the steps)
    and tokens/s. It says loudly that these are NOT the GPU figures.

This is a benchmark, not a test; it is not collected by pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import (
    CLIP_VIT_L14,
    GIB,
    REPO,
    cpu_model,
    package_versions,
    proc_status_gib,
    reset_peak_rss,
    write_random_clip,
    write_random_llama,
)

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

RECIPE = REPO / "recipes" / "llava_stage2_qlora.yaml"
GOAL_GIB = 16.0
VOCAB = 32000  # Vicuna v1.3 / Llama-1 tokenizer; lvit adds <image> and <pad> (32002 rows)

SHAPES = {
    "13b": dict(
        lm=dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40),
        vision=CLIP_VIT_L14,
        seq_len=2048,
    ),
    "7b": dict(
        lm=dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32),
        vision=CLIP_VIT_L14,
        seq_len=2048,
    ),
    # recipes/siglip2_qwen2.5_7b_qlora.yaml, estimate only (--estimate-only; the measured path writes Llama LMs):
    # Qwen2.5-7B-Instruct's config.json (huggingface.co/Qwen/Qwen2.5-7B-Instruct): 28 layers, hidden 3584,
    # intermediate 18944, 28 query / 4 key-value heads, 152064 embedding rows (a padded vocabulary: lvit's
    # <image> takes a spare row), untied LM head; google/siglip2-so400m-patch14-384's vision config (27 layers,
    # hidden 1152, intermediate 4304, 16 heads, 384 px, patch 14: 729 image tokens, no CLS).
    "qwen2.5-7b-siglip2": dict(
        lm=dict(
            num_hidden_layers=28,
            hidden_size=3584,
            intermediate_size=18944,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_rows=152064,
        ),
        vision=dict(
            kind="siglip",
            num_hidden_layers=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
        ),
        seq_len=2048,
        goal_gib=24.0,  # a 24 GB consumer card (RTX 3090 / 4090)
    ),
    # Same layout (256 image tokens from 224 px / patch 14), small enough for 2 CPU cores.
    "tiny-cpu": dict(
        lm=dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8),
        vision=dict(CLIP_VIT_L14, num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=4),
        seq_len=512,
    ),
}


# --------------------------------------------------------------------------------------------------
# Writing the random parts (child process)
# --------------------------------------------------------------------------------------------------


def lm_config(shape: str, seq_len: int):
    from transformers import LlamaConfig

    lm = SHAPES[shape]["lm"]
    return LlamaConfig(
        vocab_size=VOCAB,
        num_key_value_heads=lm["num_attention_heads"],
        max_position_embeddings=max(2048, seq_len),
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **lm,
    )


def write_tokenizer(out: Path) -> None:
    """A 32000-token tokenizer (like Vicuna's: <unk> <s> </s>, no pad, no <image>); only its size matters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
    ).save_pretrained(out)


def write_parts(shape: str, seq_len: int, root: Path) -> None:
    """Random CLIP vision tower and Llama LM saved with save_pretrained (bf16), as real checkpoints are."""
    from transformers import LlamaForCausalLM

    config = lm_config(shape, seq_len)
    with torch.device("meta"):
        lm_bytes = sum(p.numel() for p in LlamaForCausalLM(config).parameters()) * 2
    # Initialise on the GPU when the bf16 LM fits (seconds for 13B on an H100), else on the CPU (minutes).
    device = "cuda" if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] > 1.2 * lm_bytes else "cpu"
    print(f"[writer] initialising random weights on {device}", flush=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    write_random_clip(root / "clip", SHAPES[shape]["vision"], device)
    write_tokenizer(root / "lm")
    write_random_llama(root / "lm", config, device)
    size_gb = sum(f.stat().st_size for f in (root / "lm").glob("*.safetensors")) / 1e9
    print(f"[writer] wrote {shape} parts ({size_gb:.1f} GB LM shards) in {time.perf_counter() - t0:.0f} s", flush=True)
    (root / "DONE").write_text(json.dumps({"shape": shape, "seq_len": seq_len}))


def ensure_parts(shape: str, seq_len: int, root: Path) -> float:
    """Write the parts in a child process unless `root` already holds them; returns seconds spent."""
    done = root / "DONE"
    if done.is_file() and json.loads(done.read_text()).get("shape") == shape:
        print(f"reusing the {shape} parts in {root}", flush=True)
        return 0.0
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--write-parts", str(root), "--shape", shape]
    subprocess.run([*cmd, "--seq-len", str(seq_len)], check=True)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# Memory probes
# --------------------------------------------------------------------------------------------------


class Memory:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.rss_peak_reset: bool | None = None  # CPU: whether /proc/self/clear_refs reset VmHWM

    def snapshot(self) -> dict:
        if self.cuda:
            free, total = torch.cuda.mem_get_info()
            return {
                "allocated_gib": torch.cuda.memory_allocated() / GIB,
                "reserved_gib": torch.cuda.memory_reserved() / GIB,
                "max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                # Device memory outside PyTorch's caching allocator: CUDA context, cuBLAS workspaces and
                # bitsandbytes' paged (managed) optimizer states.
                "device_used_gib": (total - free) / GIB,
                "outside_torch_gib": (total - free - torch.cuda.memory_reserved()) / GIB,
            }
        rss, hwm = proc_status_gib("VmRSS"), proc_status_gib("VmHWM")
        return {
            "rss_gib": rss if rss is not None else math.nan,
            "hwm_gib": hwm if hwm is not None else math.nan,
            "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        }

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.rss_peak_reset = reset_peak_rss()


# --------------------------------------------------------------------------------------------------
# Parameter accounting and the analytic estimate
# --------------------------------------------------------------------------------------------------


def count_params(model) -> dict:
    """Logical parameter counts (a 4-bit weight counts in_features x out_features) and bytes held."""
    import bitsandbytes as bnb

    four_bit = four_bit_bytes = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = m.weight
            seen.add(id(w))
            four_bit += m.in_features * m.out_features
            qs = w.quant_state
            four_bit_bytes += w.numel() * w.element_size() + qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                four_bit_bytes += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    other = trainable = other_bytes = trainable_bytes = 0
    trainable_dtypes: dict[str, int] = {}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        other += p.numel()
        other_bytes += p.numel() * p.element_size()
        if p.requires_grad:
            trainable += p.numel()
            trainable_bytes += p.numel() * p.element_size()
            key = str(p.dtype).removeprefix("torch.")
            trainable_dtypes[key] = trainable_dtypes.get(key, 0) + p.numel()
    return {
        "total": four_bit + other,
        "four_bit": four_bit,
        "other": other,
        "trainable": trainable,
        "trainable_dtypes": trainable_dtypes,
        "weights_gib": (four_bit_bytes + other_bytes) / GIB,
        "four_bit_gib": four_bit_bytes / GIB,
        "trainable_gib": trainable_bytes / GIB,
    }


def clip_params(shape: str) -> int:
    """Exact parameter count of the shape's vision tower, CLIP or SigLIP (built on the meta device: no memory)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    v = dict(SHAPES[shape]["vision"])
    siglip = v.pop("kind", "clip") == "siglip"
    config = (SiglipVisionConfig if siglip else CLIPVisionConfig)(**v)
    with torch.device("meta"):
        return sum(p.numel() for p in (SiglipVisionModel if siglip else CLIPVisionModel)(config).parameters())


def estimate(shape: str, seq_len: int, r: int, lora_bytes: int = 4, full_logits: bool = False, batch: int = 1) -> dict:
    """Expected peak GPU memory of one QLoRA step, from the shapes alone. An estimate, not a measurement.

    Bytes on the device, by phase (PyTorch's allocator, plus the paged optimizer's 8-bit states, which
    bitsandbytes keeps in CUDA managed memory outside the allocator's counters): the static part
    (weights, adapters, optimizer states) plus the larger of the end of the forward pass (all
    checkpoints, autocast's bf16 copies of fp32 LoRA weights) and the backward pass (all adapter
    gradients, all checkpoints as an upper bound, one decoder layer recomputed). The CUDA context
    (~0.5 GiB) and the allocator's fragmentation (reserved - allocated) come on top. `batch` sequences of
    `seq_len` tokens per micro-step: the activation terms scale with it, the weights do not.
    """
    lm, v = SHAPES[shape]["lm"], SHAPES[shape]["vision"]
    h, i, n = lm["hidden_size"], lm["intermediate_size"], lm["num_hidden_layers"]
    kv = h * lm.get("num_key_value_heads", lm["num_attention_heads"]) // lm["num_attention_heads"]  # k, v width
    vh, t = v["hidden_size"], seq_len * batch
    vocab = lm.get("vocab_rows", VOCAB + 2)  # Vicuna: 32000 + <image>, <pad>; a padded vocabulary: its rows
    linear = n * (2 * h * h + 2 * h * kv + 3 * h * i)  # q o, k v, gate up down, all 4-bit
    lora = n * r * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))  # A (r x in) + B (out x r) on each
    projector_trained = vh * h + h  # linear_1; linear_2 is the frozen identity (h x h)
    projector_all = projector_trained + h * h + h
    bf16, fp32 = 2, 4
    adam8 = 2 + 2 * 4 / 256  # 8-bit m and v, one fp32 absmax per 256-value block each
    static = {
        # NF4: 4 bits/weight; double quant: one 8-bit absmax per 64 weights, one fp32 per 256 of those.
        "4-bit linear weights (NF4 + double quant)": linear * (0.5 + 1 / 64 + 4 / (64 * 256)),
        f"embeddings + LM head (bf16, {vocab} rows)": 2 * vocab * h * bf16,
        f"{v.get('kind', 'clip')} vision tower (bf16)": clip_params(shape) * bf16,
        # lvit keeps fp32 masters of what trains (lvit.train.precision): peft's trainable copy of linear_1 is fp32,
        # the original projector and the copy's frozen identity linear_2 stay bf16.
        "projector (bf16; peft's copy of linear_1 in fp32)": projector_all * bf16
        + projector_trained * fp32
        + (projector_all - projector_trained) * bf16,
        f"LoRA r={r} weights ({'fp32' if lora_bytes == 4 else 'bf16'})": lora * lora_bytes,
        "8-bit Adam states (LoRA + projector)": (lora + projector_trained) * adam8,
    }
    checkpoints = n * t * h * bf16  # each decoder layer's input, kept for the recompute
    forward = {
        "activation checkpoints (layer inputs, bf16)": checkpoints,
        "autocast's bf16 copies of fp32 LoRA weights": lora * bf16 if lora_bytes == 4 else 0,
        "autocast's bf16 copy of the fp32 projector": projector_trained * bf16,
        "full logits (bf16 + fp32 loss)": t * vocab * (bf16 + 4) if full_logits else 0,
    }
    # One layer in backward: saved bf16 inputs and outputs of the projections and attention (~10 t x h),
    # the MLP's gate/up/act/product (4 t x i), fp32 RMSNorm upcasts (2 t x h x 4), LoRA dropout masks
    # and bf16 input copies (3 B x t x (6h + i)), the bf16 dequantized weight of the largest layer.
    layer = t * (10 * h * bf16 + 4 * i * bf16 + 2 * h * 4 + 3 * (6 * h + i)) + h * i * bf16
    backward = {
        "LoRA + projector gradients": lora * lora_bytes + projector_trained * fp32,
        "activation checkpoints (upper bound: all)": checkpoints,
        "one decoder layer recomputed + its gradients": layer,
        "full logits gradient (fp32)": t * vocab * 4 if full_logits else 0,
    }
    gib = lambda d: {k: val / GIB for k, val in d.items()}  # noqa: E731
    s, f, b = sum(static.values()), sum(forward.values()), sum(backward.values())
    return {
        "static_gib": gib(static),
        "forward_extra_gib": gib(forward),
        "backward_extra_gib": gib(backward),
        "static_total_gib": s / GIB,
        "peak_allocated_gib": (s + max(f, b)) / GIB,
        "peak_phase": "backward" if b >= f else "forward",
        "cuda_context_gib": 0.5,
        "lora_params": lora,
        "four_bit_params": linear,
    }


def format_estimate(e: dict, shape: str, seq_len: int, r: int, batch: int = 1) -> str:
    lines = [f"ESTIMATE (not a measurement): {shape}, seq {seq_len}, LoRA r={r}, batch {batch}, checkpointing on"]
    for title, key in (
        ("static", "static_gib"),
        ("+ forward", "forward_extra_gib"),
        ("+ backward", "backward_extra_gib"),
    ):
        lines.append(f"  {title}:")
        lines += [f"    {k:<52} {val:7.2f} GiB" for k, val in e[key].items() if val]
    lines.append(f"  {'static total':<54} {e['static_total_gib']:7.2f} GiB")
    peak = f"peak = static + {e['peak_phase']} (allocator + paged states)"
    lines.append(f"  {peak:<54} {e['peak_allocated_gib']:7.2f} GiB")
    total = e["peak_allocated_gib"] + e["cuda_context_gib"]
    goal = SHAPES[shape].get("goal_gib", GOAL_GIB)
    lines.append(f"  {'+ CUDA context ~0.5 GiB':<54} {total:7.2f} GiB  (goal {goal:.0f} GiB)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def make_batch(model, seq_len: int, n_image: int, pixel_dtype, device, seed: int = 0) -> dict:
    """BOS + the image tokens + random text; loss only on the text (as lvit's templates mask it)."""
    g = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    n_text = seq_len - 1 - n_image
    if n_text < 2:
        raise SystemExit(f"--seq-len {seq_len} leaves no room for text after BOS + {n_image} image tokens")
    text = torch.randint(3, VOCAB, (n_text,), generator=g)
    input_ids = torch.cat([torch.tensor([1]), torch.full((n_image,), image_id), text]).unsqueeze(0)
    labels = input_ids.clone()
    labels[:, : 1 + n_image] = -100
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=g).to(pixel_dtype)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": pixel_values,
    }
    return {k: t.to(device) for k, t in batch.items()}


def run(args) -> dict:
    import bitsandbytes as bnb

    from lvit.model.adapters import add_lora
    from lvit.model.assemble import assemble
    from lvit.model.stages import apply_stage
    from lvit.model.towers import num_image_tokens
    from lvit.recipe.load import load_recipe
    from lvit.recipe.schema import ModelSection
    from lvit.train.precision import upcast_trainable

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mem = Memory(cuda)
    recipe = load_recipe(args.recipe)
    if recipe.method != "qlora":
        raise SystemExit(f"{args.recipe} is a {recipe.method!r} recipe, not qlora")
    training = recipe.training
    lr = float(training.get("learning_rate", 2e-4))
    projector_lr = recipe.projector_lr if recipe.projector_lr is not None else lr
    results: dict = {
        "shape": args.shape,
        "seq_len": args.seq_len,
        "batch_size": 1,
        "recipe": str(Path(args.recipe).resolve().relative_to(REPO))
        if Path(args.recipe).resolve().is_relative_to(REPO)
        else str(args.recipe),
        "lora": {"r": recipe.lora.r, "alpha": recipe.lora.alpha, "dropout": recipe.lora.dropout},
        "compute_dtype": recipe.lora.compute_dtype,
        "model_dtype": recipe.model.torch_dtype,
        "optimizer": "bitsandbytes.optim.PagedAdamW8bit",
        "recipe_optim": training.get("optim"),
        "activation_checkpointing": bool(training.get("activation_checkpointing", False)),
        "loss": "full logits" if args.full_logits else "TRL fused LM head",
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({cpu_model()}, {os.cpu_count()} threads)",
        "cuda": cuda,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/qlora_memory.py", *sys.argv[1:]]),
    }
    if recipe.training.get("optim") != "paged_adamw_8bit":
        print(f"note: the recipe's optim is {training.get('optim')!r}; this benchmark uses PagedAdamW8bit")

    # 1. The random parts, written by a child process.
    with contextlib.ExitStack() as stack:
        if args.parts_dir:
            root = Path(args.parts_dir)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"lvit-bench-{args.shape}-")))
        results["write_parts_s"] = ensure_parts(args.shape, args.seq_len, root)

        # 2. lvit's assembly with the 4-bit LM.
        results["memory_before_load"] = mem.snapshot()
        mem.reset_peak()
        t0 = time.perf_counter()
        model_cfg = ModelSection(
            vision_tower=str(root / "clip"),
            language_model=str(root / "lm"),
            projector=recipe.model.projector,
            vision_feature_layer=recipe.model.vision_feature_layer,
            torch_dtype=recipe.model.torch_dtype,
            projector_from=None,  # the stage-1 projector only changes values, not memory
            attn_implementation=recipe.model.attn_implementation,
        )
        torch.manual_seed(0)
        model, _processor = assemble(model_cfg, "benchmark", quantize_lm=True, compute_dtype=recipe.lora.compute_dtype)
        results["load_s"] = time.perf_counter() - t0
    # The parts folder is gone here unless --parts-dir: the model is fully in memory.

    # 3. lvit's stage freezing and adapters.
    apply_stage(model, "finetune", recipe.model.projector, train_lm=False)
    model = add_lora(model, recipe.lora, recipe.model.projector)
    upcast_trainable(model)  # as lvit.train.build.build_model: fp32 masters for what trains

    # 4. What LlavaTrainer / SFTTrainer / Trainer do before the first step.
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        for name, p in model.named_parameters():  # TRL: QLoRA adapters in bf16
            if p.requires_grad and "lora_magnitude_vector" not in name:
                p.data = p.data.to(torch.bfloat16)
        results["trl_bf16_cast"] = True
    else:
        results["trl_bf16_cast"] = False
    model.to(device)  # Trainer._move_model_to_device: the model is not flagged bnb-quantized
    if cuda and training.get("tf32"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if results["activation_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # SFTTrainer does this for a PeftModel with checkpointing
    if not args.full_logits:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    model.train()
    model.get_base_model().model.vision_tower.eval()

    groups: dict[bool, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault("multi_modal_projector" in name, []).append(p)
    wd = float(training.get("weight_decay", 0.0))
    param_groups = [{"params": ps, "lr": projector_lr if is_proj else lr} for is_proj, ps in groups.items()]
    optimizer = bnb.optim.PagedAdamW8bit(param_groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)

    results["params"] = count_params(model)
    results["memory_after_load"] = mem.snapshot()

    n_image = num_image_tokens(model.config.vision_config)
    pixel_dtype = getattr(torch, recipe.model.torch_dtype)
    batch = make_batch(model, args.seq_len, n_image, pixel_dtype, device)
    results["image_tokens"] = n_image
    results["trained_tokens"] = int((batch["labels"] != -100).sum()) - 1

    autocast = torch.autocast(device.type, dtype=getattr(torch, recipe.lora.compute_dtype))

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def step() -> dict:
        """One training step; wall seconds per phase, CPU seconds of this process, loss."""
        c0, t0 = time.process_time(), sync()
        with autocast:
            out = model(**batch) if args.full_logits else model(**batch, fused_lm_head=True)
        t1 = sync()
        out.loss.backward()
        t2 = sync()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = sync()
        return {
            "step_s": t3 - t0,
            "forward_s": t1 - t0,
            "backward_s": t2 - t1,
            "optimizer_s": t3 - t2,
            "cpu_s": time.process_time() - c0,
            "loss": float(out.loss.detach()),
        }

    # Warm-up: allocates the optimizer states and autotunes kernels; its peak counts too.
    mem.reset_peak()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warm = step()
    results["warmup_warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    for text in results["warmup_warnings"]:
        print(f"warning during the warm-up step: {text}", flush=True)
    results["warmup"] = warm
    results["memory_warmup_step"] = mem.snapshot()
    mem.reset_peak()
    timed = [step() for _ in range(args.steps)]
    results["memory_steps"] = mem.snapshot()
    results["steps"] = timed
    results["step_s"] = statistics.median(x["step_s"] for x in timed)
    results["step_s_min"] = min(x["step_s"] for x in timed)
    results["tokens_per_s"] = args.seq_len / results["step_s"]
    results["losses"] = [warm["loss"], *(x["loss"] for x in timed)]
    if not all(math.isfinite(x) for x in results["losses"]):
        print(f"WARNING: non-finite loss {results['losses']}", flush=True)
    lora_bytes = 4 if "float32" in results["params"]["trainable_dtypes"] else 2
    results["estimate"] = estimate(args.shape, args.seq_len, recipe.lora.r, lora_bytes, args.full_logits)
    results["rss_peak_reset"] = mem.rss_peak_reset
    if cuda:
        phases = [results[k] for k in ("memory_after_load", "memory_warmup_step", "memory_steps")]
        peak = max(m["max_reserved_gib"] for m in phases)  # loading included
        outside = max(m["outside_torch_gib"] for m in phases)
        results["peak_device_gib"] = peak + outside
        results["goal_16gib_holds"] = results["peak_device_gib"] <= GOAL_GIB
    return results


def versions() -> dict:
    names = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate")
    return {"python": platform.python_version(), **package_versions(names)}


def fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def phases(r: dict) -> str:
    med = {k: statistics.median(x[k] for x in r["steps"]) for k in ("forward_s", "backward_s", "optimizer_s", "cpu_s")}
    text = f"{med['forward_s']:.2f} / {med['backward_s']:.2f} / {med['optimizer_s']:.2f} s"
    if not r["cuda"]:
        text += f" (process CPU time {med['cpu_s']:.1f} s, {os.cpu_count()} threads)"
    return text


def report(r: dict) -> str:
    p = r["params"]
    dtypes = ", ".join(f"{k} {fmt_count(v)}" for k, v in p["trainable_dtypes"].items())
    rows = [
        ("shape", f"{r['shape']} (seq {r['seq_len']} = BOS + {r['image_tokens']} image + text, batch 1)"),
        ("device", r["device"]),
        (
            "params total / 4-bit / trainable",
            f"{fmt_count(p['total'])} / {fmt_count(p['four_bit'])} / {fmt_count(p['trainable'])} ({dtypes})",
        ),
        ("weights held", f"{p['weights_gib']:.2f} GiB (4-bit layers {p['four_bit_gib']:.2f} GiB)"),
    ]
    if r["cuda"]:
        a, w, s = r["memory_after_load"], r["memory_warmup_step"], r["memory_steps"]
        rows += [
            ("after load: allocated / reserved", f"{a['allocated_gib']:.2f} / {a['reserved_gib']:.2f} GiB"),
            ("loading: max allocated / reserved", f"{a['max_allocated_gib']:.2f} / {a['max_reserved_gib']:.2f} GiB"),
            (
                "warm-up step: max allocated / reserved",
                f"{w['max_allocated_gib']:.2f} / {w['max_reserved_gib']:.2f} GiB",
            ),
            (
                "timed steps: max allocated / reserved",
                f"{s['max_allocated_gib']:.2f} / {s['max_reserved_gib']:.2f} GiB",
            ),
            ("outside torch (context, paged optimizer)", f"{s['outside_torch_gib']:.2f} GiB"),
            ("peak device use (reserved + outside)", f"{r['peak_device_gib']:.2f} GiB"),
        ]
    else:
        a, w, s = r["memory_after_load"], r["memory_warmup_step"], r["memory_steps"]
        rows += [
            (
                "RSS before load (imports) / after load",
                f"{r['memory_before_load']['rss_gib']:.2f} / {a['rss_gib']:.2f} GiB",
            ),
            ("peak RSS, warm-up step / timed steps", f"{w['hwm_gib']:.2f} / {s['hwm_gib']:.2f} GiB"),
            ("peak RSS of the process (getrusage)", f"{s['ru_maxrss_gib']:.2f} GiB"),
        ]
    rows += [
        (
            "step time (median of timed steps)",
            f"{r['step_s']:.2f} s (min {r['step_s_min']:.2f}, warm-up {r['warmup']['step_s']:.2f} s)",
        ),
        ("  forward / backward / optimizer", phases(r)),
        ("tokens/s", f"{r['tokens_per_s']:.0f}"),
        ("loss", " -> ".join(f"{x:.3f}" for x in r["losses"])),
        ("estimate (analytic, not measured)", f"{r['estimate']['peak_allocated_gib']:.2f} GiB + ~0.5 GiB CUDA context"),
    ]
    if r["cuda"]:
        verdict = "HOLDS" if r["goal_16gib_holds"] else "FAILS"
        rows.append((f"{GOAL_GIB:.0f} GiB goal", f"{verdict} ({r['peak_device_gib']:.2f} GiB)"))
    else:
        rows.append((f"{GOAL_GIB:.0f} GiB goal", "not judged: CPU run of a scaled-down shape"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 2048; tiny-cpu 512)")
    ap.add_argument("--steps", type=int, help="timed steps after one warm-up step (default 2 on a GPU, 1 on the CPU)")
    ap.add_argument("--json", metavar="OUT", help="write all figures to this JSON file")
    ap.add_argument("--recipe", default=str(RECIPE), help="the QLoRA recipe to read LoRA and optimizer settings from")
    ap.add_argument("--parts-dir", help="keep the written random checkpoints here and reuse them (13B: 26 GB)")
    ap.add_argument("--full-logits", action="store_true", help="plain model loss (full logits), not TRL's fused head")
    ap.add_argument("--estimate-only", action="store_true", help="print the analytic estimate and exit (no model)")
    ap.add_argument("--batch", type=int, default=1, help="--estimate-only: sequences per micro-step (default 1)")
    ap.add_argument("--write-parts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.estimate_only:
        from lvit.recipe.load import load_recipe

        r = load_recipe(args.recipe).lora.r
        seq = args.seq_len or SHAPES[args.shape]["seq_len"]
        e = estimate(args.shape, seq, r, full_logits=args.full_logits, batch=args.batch)
        print(format_estimate(e, args.shape, seq, r, args.batch))
        return 0

    if args.write_parts:
        write_parts(args.shape, args.seq_len or SHAPES[args.shape]["seq_len"], Path(args.write_parts))
        return 0

    if not torch.cuda.is_available() and args.shape != "tiny-cpu":
        print(
            "\n*** No CUDA device: running the scaled-down 'tiny-cpu' shape on the CPU instead of "
            f"{args.shape!r}. ***\n"
            "*** These are NOT the GPU figures: same code path, toy sizes, CPU RSS instead of GPU memory. ***\n",
            flush=True,
        )
        args.shape = "tiny-cpu"
        args.seq_len = None
    if args.seq_len is None:
        args.seq_len = SHAPES[args.shape]["seq_len"]
    if args.steps is None:
        args.steps = 2 if torch.cuda.is_available() else 1  # keeps the CPU run within ~3 minutes on 2 cores
    if args.steps < 1:
        ap.error("--steps must be at least 1")

    results = run(args)
    banner = "GPU run" if results["cuda"] else "SCALED-DOWN CPU RUN - not the GPU figure"
    print(f"\nQLoRA step benchmark ({banner})\n{report(results)}\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
