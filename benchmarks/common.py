"""Helpers shared by the benchmark scripts in this folder.

The scripts run as `python benchmarks/NAME.py` from the repository root; Python then puts this folder first
on `sys.path`, so they import this module as `common`. Heavy libraries (torch, transformers) are imported
inside the functions that need them: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import random
from itertools import accumulate
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3

# ---------------------------------------------------------------------------------------------
# the machine and this process


def proc_status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, ...), or None where there is none (not Linux)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def proc_status_gib(field: str) -> float | None:
    """`proc_status_kib` in GiB."""
    kib = proc_status_kib(field)
    return None if kib is None else kib * 1024 / GIB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what `platform` knows)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def package_versions(names) -> dict[str, str]:
    """Installed versions of the named distributions; those not installed are left out."""
    out = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


# ---------------------------------------------------------------------------------------------
# random model parts, written like real checkpoints

# CLIP ViT-L/14 (openai/clip-vit-large-patch14's vision tower, LLaVA's): CLIPVisionConfig keyword arguments.
CLIP_VIT_L14 = dict(
    num_hidden_layers=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)


def save_clip_image_processor(folder: Path, image_size: int) -> None:
    """CLIP's image processor (resize + centre crop) at `image_size` px, saved into `folder`."""
    from transformers import CLIPImageProcessor

    size = {"shortest_edge": image_size}
    CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)


def write_random_clip(folder: Path, vision: dict, device: str = "cpu") -> None:
    """A CLIP vision tower with random bf16 weights (`vision`: CLIPVisionConfig keyword arguments) and its
    image processor, saved into `folder` with `save_pretrained`. Seed torch before calling for fixed weights."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**vision)
    with torch.device(device):
        model = CLIPVisionModel._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    save_clip_image_processor(folder, config.image_size)


def write_random_llama(folder: Path, config, device: str = "cpu") -> None:
    """A `LlamaForCausalLM` with random bf16 weights built on `device`, saved into `folder` in 5 GB shards."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")


# ---------------------------------------------------------------------------------------------
# synthetic text

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ee")]


def syllable_words(rng: random.Random, draws: int, syllables_per_word: tuple[int, ...]) -> set[str]:
    """Pseudo-words of `SYLLABLES`, one per draw (repeats collapse), each of a syllable count drawn from
    `syllables_per_word`."""
    return {"".join(rng.choices(SYLLABLES, k=rng.choice(syllables_per_word))) for _ in range(draws)}


def zipf_cum_weights(n: int, exponent: float = 1.0) -> list[float]:
    """Cumulative Zipf weights (rank r weighs 1 / r**exponent) for `random.choices(..., cum_weights=...)`."""
    return list(accumulate(1.0 / (rank + 1) ** exponent for rank in range(n)))
