"""Recipes: YAML files that describe one training run, validated before anything loads.

A recipe has lvit's own sections (`stage`, `model`, `data`, and a few batch/optimizer keys) and a
`training:` section that is passed through to `trl.SFTConfig`, so every `SFTConfig` /
`TrainingArguments` option works without lvit re-declaring it. Every key can be overridden on the
command line with `dotted.key=value` (the value is read as YAML).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

STAGES = ("align", "finetune")


@dataclass
class ModelSection:
    """Where the parts come from and how they are joined."""

    vision_tower: str
    """A CLIP or SigLIP / SigLIP2 (fixed resolution) vision checkpoint (hub id or local folder); a full
    CLIPModel / SiglipModel checkpoint works too. CLIP's CLS token is dropped; SigLIP has none, every patch
    feature is used (`lvit.model.towers.VISION_TOWERS`)."""
    language_model: str
    """A causal LM with `.model` and `.lm_head` (Llama, Qwen2/3, Mistral, Gemma 2/3...; hub id or local
    folder); its tokenizer is loaded from the same place."""
    projector: Literal["linear", "mlp2x_gelu"] = "linear"
    """`linear`: the paper's single matrix W. `mlp2x_gelu`: LLaVA-1.5's two-layer MLP."""
    vision_feature_layer: int = -2
    """Which vision-tower layer feeds the projector; -2 (the penultimate) as in LLaVA."""
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The dtype the parts are loaded in."""
    projector_from: str | None = None
    """A stage-1 (`align`) run folder whose trained projector initialises this run's projector."""
    attn_implementation: str | None = None
    """Passed to `from_pretrained` (`sdpa`, `flash_attention_2`, `eager`); None lets transformers choose."""
    architecture: Literal["llava", "llava_next"] = "llava"
    """`llava`: every image at the tower's size (`LlavaForConditionalGeneration`). `llava_next`: LLaVA-NeXT's AnyRes
    (`LlavaNextForConditionalGeneration`, `lvit/model/next.py`): each image at the best-fitting pinpoint
    resolution, in tiles, so an image's tokens depend on its size."""
    image_grid_pinpoints: list[list[int]] | None = None
    """llava_next: the (height, width) resolutions an image may be seen at; null: LLaVA-NeXT's grid for the tower
    (1x2, 2x1, 2x2, 3x1 and 1x3 tiles)."""


@dataclass
class SourceSection:
    """One source of a mixture (`data.sources`): its own files and checks, and how much of it an epoch draws
    (`lvit/data/mixture.py`). Keys left out take the `data` section's value."""

    path: str
    """The source's data, in any format `data.path` takes."""
    name: str | None = None
    """The source's name in logs, reports and `lvit_log.jsonl` (`loss/<name>`); default: the file's stem."""
    image_folder: str | None = None
    format: Literal["auto", "llava", "chat", "hf"] | None = None
    template: Literal["vicuna_v1", "plain", "auto"] | None = None
    """Where this source's records must be rendered otherwise (the export's chat template is `data.template`)."""
    on_bad_record: Literal["error", "skip"] | None = None
    weight: float | None = None
    """This source's share of each epoch's samples (weights are normalised over the sources; all sources weigh or
    none does); the epoch's size is `data.samples_per_epoch`."""
    count: int | None = None
    """Samples an epoch draws from this source (more than it has: its records repeat, evenly)."""
    fraction: float | None = None
    """A fraction of the source's records (those in its file) an epoch draws (rounded up; above 1: its records
    repeat)."""
    select: Literal["random", "first", "last"] = "random"
    """Which records `count` / `fraction` take: `random` (seeded; each epoch the next ones, so every record comes
    before any repeats), or the file's `first` / `last` ones (the same every epoch: LLaVA-OneVision's `first:N`,
    `end:N`)."""


@dataclass
class DataSection:
    """Training data and how a record becomes tokens."""

    path: str | None = None
    """The data: a JSON (a list of records) or JSON Lines file in LLaVA or chat format, or a Hugging Face
    dataset (a `save_to_disk` folder, parquet or arrow files). See `lvit/data/records.py`. A `.yaml` file is a
    LLaVA-OneVision data YAML (`datasets: [{json_path, sampling_strategy}]`), read as a mixture."""
    sources: list[SourceSection] | None = None
    """A mixture: several sources instead of `path` (`lvit/data/mixture.py`)."""
    streaming: bool = False
    """Read the data as it is trained on, never whole in memory (`lvit/data/stream/`): JSON Lines, parquet or
    WebDataset `.tar` shards (a file, folder or glob; local or object storage), each process and data-loader worker
    reading its own shards, bad samples skipped and listed as they are met (`data.on_bad_record`), the place in the
    data saved in every checkpoint. Needs `training.max_steps`; sources mix by `weight`."""
    shuffle_buffer: int = 1000
    """data.streaming: the samples read ahead and shuffled together (per source and reader; shards are shuffled
    too); 0: the files' order. Memory holds this many samples, images included, per source and reader."""
    samples_per_epoch: int | None = None
    """Weighted sources (`weight`): the samples of one epoch; null: as many as the sources give without any record
    repeating (the source that runs out first sets it)."""
    image_folder: str | None = None
    """Folder that relative image paths in the data are resolved against."""
    format: Literal["auto", "llava", "chat", "hf"] = "auto"
    """The data's format; `auto` detects it (a folder / .parquet / .arrow is `hf`, else from the first record)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A record that cannot be trained on (`lvit data check` lists them): `error` stops before training with
    the checker's report; `skip` trains on the rest and lists each skipped record with its reason in the run
    folder's `skipped_records.jsonl`."""
    template: Literal["vicuna_v1", "plain", "auto"] = "vicuna_v1"
    """Conversation template; see `lvit/templates/`. `auto`: the language model's own chat template (Llama 3,
    Qwen, Mistral, Gemma...; `lvit/templates/chat_template.py`), refused with the reason if lvit cannot split it
    exactly."""
    max_length: int = 2048
    """Longest sequence in tokens, image tokens included."""
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    """A sample longer than max_length: `truncate` cuts text after the image (never the image itself;
    a sample that cannot be cut so is dropped and recorded), `drop` drops and records it, `error` stops."""
    image_aspect_ratio: Literal["square", "pad"] = "square"
    """`square`: the processor's resize and centre crop. `pad`: pad to a square with the processor's
    mean colour first (LLaVA-1.5)."""
    group_by_modality_length: bool = False
    """Each optimizer step draws only image records or only text-only records (LLaVA-1.5's
    `--group_by_modality_length`; `lvit/data/modality_sampler.py`). False: random batches."""
    packing: bool = True
    """Padding-free batches (`lvit/data/packing.py`): each micro-batch's samples laid end to end in rows,
    positions restarting at 0 per sample, attention confined to each sample. The samples of a step are those of
    the unpacked run; only the layout changes (loss and gradients equal). With sdpa the language model runs
    lvit's packed sdpa (`lvit/model/packed_attention.py`: each sample's attention alone, no mask) and the
    micro-batch is one row. Needs `model.attn_implementation` eager, sdpa or flash_attention_2/3 (None picks
    sdpa or eager)."""
    max_tokens_per_row: int | None = None
    """packing: the most tokens in one packed row; a row always holds the longest sample it gets, so it may be
    below `max_length`. None: lvit chooses for the attention kernel (one row with sdpa and flash attention;
    rows no longer than the micro-batch's longest sample with eager). With flash attention the whole
    micro-batch is always one row (its varlen kernel reads sample bounds from one row)."""
    max_tokens_per_batch: int | None = None
    """Token-budget micro-batches (`lvit/data/token_budget.py`): each micro-batch takes samples, in shuffled
    order, while their tokens (image tokens included) stay within this many; `per_device_train_batch_size`
    is then unused. This CHANGES the samples per step (unlike `packing`). None (default): fixed-size batches.
    One process only; not with `global_batch_size` (set `training.gradient_accumulation_steps`) nor with
    another batch order (`group_by_modality_length`, `training.train_sampling_strategy`)."""


@dataclass
class LoraSection:
    """LoRA adapters on every linear layer of the language model (methods `lora` and `qlora`).

    Defaults: LLaVA-1.5's LoRA recipe (github.com/haotian-liu/LLaVA, scripts/v1_5/finetune_lora.sh:
    lora_r 128, lora_alpha 256; lora_dropout 0.05 is llava/train/train.py's default).
    """

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """qlora only: the dtype the 4-bit layers compute in (QLoRA paper: bf16)."""
    vision_tower: bool = False
    """Adapters on the vision tower's linear layers too, up to its feature layer (the tower is never quantized);
    `vision_tower_lr` sets their learning rate. false: the tower stays frozen, as in LLaVA-1.5's LoRA recipe."""


@dataclass
class EvalSection:
    """Evaluation during training (`lvit.eval.callback`): answers to a question set, scored, written to
    the run folder's `eval/` at the end (and `eval/step-N/` every `every_n_steps` steps). lvit's own keys."""

    data: str | dict[str, str] | None = None
    """Questions with reference answers, in any format lvit reads; null: no evaluation. A mapping name -> file holds
    several held-out sets (one per source of a mixture), each scored on its own into `eval/<name>/`."""
    image_folder: str | None = None
    """Folder the questions' image paths are relative to; null: `data.image_folder` (a named set: the image folder
    of the source of that name, if there is one)."""
    metric: Literal["exact_match", "scienceqa", "pope"] = "exact_match"
    """`exact_match` (case-insensitive), `scienceqa` (LLaVA's answer parsing), `pope` (LLaVA's yes/no parsing)."""
    max_new_tokens: int = 32
    every_n_steps: int | None = None
    """Also evaluate every this many optimizer steps; null: only at the end."""
    batch_size: int = 16
    """Questions per generation batch."""


@dataclass
class Recipe:
    stage: Literal["align", "finetune"]
    """`align` (stage 1: only the projector trains) or `finetune` (stage 2: projector and LM train)."""
    model: ModelSection
    data: DataSection
    method: Literal["full", "lora", "qlora"] = "full"
    """How the LM trains in `finetune`: all weights (`full`), LoRA on a 16-bit base (`lora`), or LoRA
    on a 4-bit NF4 base with double quantization (`qlora`). The projector always trains fully."""
    lora: LoraSection = field(default_factory=LoraSection)
    global_batch_size: int | None = None
    """Samples per optimizer step over all processes. When set, gradient accumulation is derived
    from it (global = per-device batch x accumulation x processes) so it holds on any GPU count."""
    projector_lr: float | None = None
    """A separate learning rate for the projector (LLaVA's `mm_projector_lr`); None: the main one."""
    vision_tower_lr: float | None = None
    """Stage 2 only: train the vision tower too, at this learning rate (LLaVA-NeXT's stage 2 uses 2e-6: its
    `mm_vision_tower_lr`); None: the tower stays frozen, as in LLaVA and LLaVA-1.5. The tower's layers after the
    feature layer (and its post-layernorm) never reach the language model and stay frozen."""
    compact_head: bool = True
    """The training loss projects only the labelled positions onto the vocabulary (`lvit/train/loss.py`); the same
    loss and gradients as scoring every position, less work. false: TRL's loss."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Evaluation during training; off unless `eval.data` is set."""
    training: dict[str, Any] = field(default_factory=dict)
    """Passed to `trl.SFTConfig`."""
    source: str = "<recipe>"
    """The file the recipe was read from (set by `load_recipe`, for messages)."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out
