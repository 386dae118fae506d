"""Mixtures: several data sources in one run, each with its own files and checks and its share of every epoch.

A recipe names its data one of three ways, all read here into `Source`s (`sources_of`):
- `data.path`: one source, the whole of it (no mixture);
- `data.sources`: a list of sources, each with its `path` and, where it differs from the `data` section, its
  `image_folder`, `format`, `template` and `on_bad_record`, and how much of it an epoch draws: all of it (the
  default), a `weight` (a share of the epoch), a `count` or a `fraction` of its records, from a seeded random
  draw or the file's `first` / `last` records (`select`);
- `data.path` naming a `.yaml` file: LLaVA-OneVision's data YAML, read as it is (LLaVA-NeXT's
  `llava/train/train.py`, `LazySupervisedDataset`, github.com/LLaVA-VL/LLaVA-NeXT): `datasets:` lists
  `{json_path, sampling_strategy}`, the strategy `all` (the default), `first:N`, `end:N` or `random:N`, N a
  count or a percentage of the file's records (rounded up, as there). Its images resolve against
  `data.image_folder` (LLaVA-NeXT's single `--image_folder`).

How much each source gives an epoch (`plan`, lvit's own rules where the peers differ):
- weights are normalised to shares; the epoch has `data.samples_per_epoch` samples, by default the most the
  sources give without any record repeating (LLaMA-Factory's `interleave_under`: the source that runs out first
  sets it); each source's draws are its share rounded by largest remainder, so the realised shares are the
  requested ones to within one sample per epoch;
- `random` draws take each epoch the next records of a seeded permutation of the source (a new permutation
  once all were taken), so an epoch never repeats a record before every record has come, and over several
  epochs a subsampled source shows more of itself (LLaVA-NeXT draws its `random:N` once; with one epoch, as
  it trains, the two agree); `first` / `last` take the same records every epoch;
- the records are a source's records that passed the checks (`data.on_bad_record`, `data.overlong`),
  `first` / `last` counting by the file's order.

`lvit.data.mixture_sampler` turns the plan into each epoch's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from lvit.errors import LvitError

YAML_SUFFIXES = (".yaml", ".yml")
_STRATEGIES = ("all", "first", "end", "random")


@dataclass(frozen=True)
class Source:
    """One source of a run's data, every key resolved (the `data` section's value where the source sets none)."""

    name: str
    path: str
    format: str
    image_folder: str | None
    template: str
    on_bad_record: str
    max_length: int
    overlong: str
    weight: float | None = None
    count: int | None = None
    fraction: float | None = None
    select: str = "random"

    @property
    def amount(self) -> str:
        """How much of it an epoch draws, in words: `all`, `weight 0.3`, `5000 random`, `10% first`..."""
        if self.weight is not None:
            return f"weight {self.weight:g}"
        if self.count is not None:
            return f"{self.count} {self.select}"
        if self.fraction is not None:
            return f"{self.fraction:.4g}x {self.select}" if self.fraction > 1 else f"{self.fraction:.2%} {self.select}"
        return "all"


def is_mixture(data) -> bool:
    """Whether the recipe's data is a mixture (`data.sources`, or a LLaVA-OneVision data YAML)."""
    return data.sources is not None or _is_yaml(data.path)


def checked_source(data, where: str = "<recipe>"):
    """The data a check of a trained run reads (export's self-check, GGUF's check prompts): `data` itself for one
    source; for a mixture, its first source rendered with `data.template` (else its first source), as a section
    with `data`'s other keys. A mixture whose files are gone gives its first file as written (the checks then fall
    back to a synthetic sample)."""
    if not is_mixture(data):
        return data
    try:
        sources = sources_of(data, where)
        source = next((s for s in sources if s.template == data.template), sources[0])
        path, fmt, folder = source.path, source.format, source.image_folder
    except LvitError:
        path = data.sources[0].path if data.sources else data.path
        fmt, folder = data.format, data.image_folder
    keys = ("template", "image_aspect_ratio", "max_length", "overlong", "on_bad_record")
    return SimpleNamespace(path=path, format=fmt, image_folder=folder, **{k: getattr(data, k) for k in keys})


def is_remote_or_glob(path: str) -> bool:
    """A URL (`s3://...`) or a glob (`shards/*.tar`): found by `data.streaming`'s shard listing, not on the disk."""
    return "://" in str(path) or any(c in str(path) for c in "*?[")


def _is_yaml(path) -> bool:
    return path is not None and Path(path).suffix.lower() in YAML_SUFFIXES


def sources_of(data, where: str = "<recipe>") -> list[Source]:
    """The sources of a recipe's `data` section, checked (names unique, amounts valid, files present)."""
    common = {
        "format": data.format,
        "image_folder": data.image_folder,
        "template": data.template,
        "on_bad_record": data.on_bad_record,
        "max_length": data.max_length,
        "overlong": data.overlong,
    }
    if data.sources is None and not _is_yaml(data.path):
        return [Source(name=Path(str(data.path)).stem or "data", path=str(data.path), **common)]
    raw = read_onevision_yaml(data.path) if data.sources is None else [_from_section(s) for s in data.sources]
    sources, names = [], set()
    for i, entry in enumerate(raw):
        key = f"data.sources[{i}]" if data.sources is not None else f"{data.path}, datasets[{i}]"
        given = entry.pop("name", None)
        name = given or Path(entry["path"]).stem or f"source{i}"
        if name in names:
            if given:
                raise LvitError(f"{where}: {key}.name {name!r} is used twice; give each source its own name.")
            name = _unique(name, names)
        names.add(name)
        settings = {**common, **{k: v for k, v in entry.items() if v is not None}}
        source = Source(name=name, **settings)
        _check_amount(source, key, where, getattr(data, "streaming", False))
        sources.append(source)
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        shown = ", ".join(s.name for s, w in zip(sources, weighted, strict=True) if not w)
        raise LvitError(
            f"{where}: some sources of data.sources have a weight and some ({shown}) do not. Weights share out the "
            "epoch, so give every source a weight, or none (then use count / fraction, or nothing for all)."
        )
    if data.samples_per_epoch is not None and not any(weighted):
        raise LvitError(
            f"{where}: data.samples_per_epoch sizes an epoch of weighted sources; no source has a weight. Remove "
            "it, or give the sources weights."
        )
    if data.samples_per_epoch is not None and data.samples_per_epoch < 1:
        raise LvitError(f"{where}: data.samples_per_epoch must be at least 1, got {data.samples_per_epoch}.")
    return sources


def _unique(name: str, names: set[str]) -> str:
    k = 2
    while f"{name}-{k}" in names:
        k += 1
    return f"{name}-{k}"


def _from_section(section) -> dict:
    keys = ("name", "path", "format", "image_folder", "template", "on_bad_record", "weight", "count", "fraction")
    out = {k: getattr(section, k) for k in keys}
    out["select"] = section.select
    return out


def _check_amount(source: Source, key: str, where: str, streaming: bool = False) -> None:
    given = [k for k in ("weight", "count", "fraction") if getattr(source, k) is not None]
    if len(given) > 1:
        both = " and ".join(given)
        raise LvitError(f"{where}: {key} sets {both}; set one of weight, count, fraction (or none: all of it).")
    if source.weight is not None and not (source.weight > 0 and math.isfinite(source.weight)):
        raise LvitError(f"{where}: {key}.weight must be above 0, got {source.weight}.")
    if source.count is not None and source.count < 1:
        raise LvitError(f"{where}: {key}.count must be at least 1, got {source.count}.")
    if source.fraction is not None and not (source.fraction > 0 and math.isfinite(source.fraction)):
        raise LvitError(f"{where}: {key}.fraction must be above 0 (1 is all of it), got {source.fraction}.")
    if source.select != "random" and source.count is None and source.fraction is None:
        raise LvitError(
            f"{where}: {key}.select {source.select!r} picks which records a count or fraction takes; set "
            f"{key}.count or {key}.fraction, or remove select."
        )
    if not Path(source.path).exists() and not (streaming and is_remote_or_glob(source.path)):
        raise LvitError(f"{where}: {key}.path = {source.path!r}: file not found.")
    if source.image_folder is not None and not Path(source.image_folder).is_dir():
        raise LvitError(f"{where}: {key}.image_folder = {source.image_folder!r}: folder not found.")


def read_onevision_yaml(path) -> list[dict]:
    """The sources of a LLaVA-OneVision data YAML (see the module docstring), as `Source` keys."""
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise LvitError(f"{path}: cannot read it as a LLaVA-OneVision data YAML: {exc}") from None
    datasets = loaded.get("datasets") if isinstance(loaded, dict) else None
    if not isinstance(datasets, list) or not datasets:
        raise LvitError(
            f"{path}: a data YAML lists its sources under `datasets:`, each `{{json_path: FILE, sampling_strategy: "
            "all | first:N | end:N | random:N}}` (N a count or a percentage); this file has no such list."
        )
    out = []
    for i, entry in enumerate(datasets):
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise LvitError(f"{path}: datasets[{i}] has no json_path (the source's JSON / JSON Lines file).")
        file = Path(entry["json_path"])
        if not file.is_absolute() and not file.exists() and (path.parent / file).exists():
            file = path.parent / file  # lvit's addition: a path relative to the YAML file
        strategy = _strategy(str(entry.get("sampling_strategy", "all")), f"{path}, datasets[{i}]")
        out.append({"path": str(file), **strategy})
    return out


def _strategy(text: str, key: str) -> dict:
    """`all`, `first:N`, `end:N`, `random:N` (N a count or `P%`) as Source keys."""
    kind, _, number = text.strip().partition(":")
    if kind not in _STRATEGIES or (kind != "all" and number == "" and kind != "random"):
        raise LvitError(
            f"{key}: sampling_strategy {text!r} is not one lvit reads; use all, first:N, end:N or random:N (N a count "
            "or a percentage such as 10%)."
        )
    if kind == "all" or number == "":
        return {}
    select = {"first": "first", "end": "last", "random": "random"}[kind]
    try:
        if number.endswith("%"):
            return {"fraction": float(number[:-1]) / 100, "select": select}
        return {"count": int(number), "select": select}
    except ValueError:
        raise LvitError(f"{key}: sampling_strategy {text!r}: {number!r} is not a count or a percentage.") from None


# ---------------------------------------------------------------------------------------------
# how much each source gives an epoch


@dataclass
class Plan:
    """What each epoch draws: per source, its rows of the training dataset and how many draws an epoch takes."""

    sources: list[Source]
    rows: list[list[int]]
    """Per source: the training dataset's rows that hold its records (in the file's order)."""
    per_epoch: list[int]
    """Per source: the samples one epoch draws from it."""
    fixed: list[bool]
    """Per source: the same rows every epoch (`all`, `first`, `last`), else a seeded rotation (`random`)."""
    totals: list[int]
    """Per source: the records its file holds."""

    @property
    def samples_per_epoch(self) -> int:
        return sum(self.per_epoch)

    def shares(self) -> list[float]:
        total = self.samples_per_epoch
        return [n / total for n in self.per_epoch]

    def describe(self) -> list[dict]:
        """Per source, what `mixture.json` and the logs say of it."""
        out = []
        for source, rows, n, share in zip(self.sources, self.rows, self.per_epoch, self.shares(), strict=True):
            repeats = n / len(rows) if rows else 0.0
            out.append(
                {
                    "name": source.name,
                    "path": source.path,
                    "requested": source.amount,
                    "records": len(rows),
                    "per_epoch": n,
                    "share": round(share, 6),
                    "repeats": round(repeats, 4) if repeats > 1 else None,
                }
            )
        return out


def plan(sources: list[Source], rows: list[list[int]], indices: list[list[int]], totals: list[int], samples=None):
    """The `Plan` of a mixture. `rows[s]`: source s's rows in the training dataset; `indices[s]`: their records'
    places in the source's file; `totals[s]`: the records its file holds; `samples`: `data.samples_per_epoch`."""
    per_epoch, fixed, kept = [], [], []
    for source, its_rows, its_indices, total in zip(sources, rows, indices, totals, strict=True):
        if not its_rows:
            raise LvitError(
                f"data source {source.name!r} ({source.path}): no record of it can be trained on (see "
                f"`lvit data check {source.path}`); fix it or take it out of data.sources."
            )
        if source.select in ("first", "last") and source.weight is None:
            n = source.count if source.count is not None else math.ceil(source.fraction * total)
            cut = n if source.select == "first" else total - n
            first = source.select == "first"
            its_rows = [r for r, i in zip(its_rows, its_indices, strict=True) if (i < cut) == first]
            if not its_rows:
                raise LvitError(f"data source {source.name!r}: its {source.select} {n} records hold none to train on.")
            per_epoch.append(len(its_rows))
            fixed.append(True)
        elif source.count is not None:
            per_epoch.append(source.count)
            fixed.append(False)
        elif source.fraction is not None:  # of the file's records, as LLaVA-OneVision's `random:N%`
            per_epoch.append(math.ceil(source.fraction * total))
            fixed.append(False)
        else:
            per_epoch.append(len(its_rows))
            fixed.append(source.weight is None)
        kept.append(its_rows)
    if sources and sources[0].weight is not None:
        per_epoch = _weighted([s.weight for s in sources], [len(r) for r in kept], samples)
    return Plan(list(sources), kept, per_epoch, fixed, list(totals))


def _weighted(weights: list[float], sizes: list[int], samples: int | None) -> list[int]:
    """Draws per source for shares `weights` (normalised) of `samples` draws (None: the most without a repeat),
    rounded by largest remainder so they add up to the total."""
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    if samples is None:
        samples = max(1, math.floor(min(n / p for n, p in zip(sizes, shares, strict=True)) + 1e-9))
    exact = [p * samples for p in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: samples - sum(counts)]:
        counts[i] += 1
    return counts
