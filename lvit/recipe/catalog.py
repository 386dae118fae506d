"""The recipes that ship inside the package (lvit/recipes/): list them, find one by name, copy one.

A checkout's top-level `recipes/` is a symlink to lvit/recipes/, so the documented paths
(`lvit finetune recipes/llava_stage2.yaml`) work in a checkout, and a shipped recipe's name
(`lvit finetune llava_stage2`) works anywhere lvit is installed.

Names: a training recipe is named by its file name without `.yaml` (`llava_stage2`); a launcher
config by its path under the recipes folder (`accelerate/fsdp_8gpu.yaml`). A recipe's description
is its first comment line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lvit.errors import LvitError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
_SUFFIXES = (".yaml", ".json")


@dataclass(frozen=True)
class ShippedRecipe:
    name: str  # what `lvit recipes cp` and `lvit finetune` accept
    path: Path
    description: str


def _describe(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    if path.suffix == ".json":
        return "DeepSpeed config, named by the accelerate config beside it"
    return ""


def shipped_recipes() -> list[ShippedRecipe]:
    """The training recipes (by name), then the launcher configs under accelerate/ (by relative path)."""
    training = [ShippedRecipe(p.stem, p, _describe(p)) for p in sorted(RECIPES_DIR.glob("*.yaml"))]
    launch = [
        ShippedRecipe(p.relative_to(RECIPES_DIR).as_posix(), p, _describe(p))
        for p in sorted(RECIPES_DIR.glob("*/*"))
        if p.is_file() and p.suffix in _SUFFIXES
    ]
    return training + launch


def find_shipped(name: str | Path, training_only: bool = False) -> Path | None:
    """The shipped file NAME stands for (with or without `.yaml`, optionally `recipes/...`), or None."""
    text = Path(name).as_posix()
    if text.startswith("recipes/"):
        text = text[len("recipes/") :]
    for candidate in (text, f"{text}.yaml"):
        for recipe in shipped_recipes():
            if recipe.path.relative_to(RECIPES_DIR).as_posix() == candidate:
                if training_only and recipe.path.parent != RECIPES_DIR:
                    return None
                return recipe.path
    return None


def resolve_recipe(path: str | Path) -> Path:
    """`path` if that file exists, else the shipped training recipe it names, else `path` unchanged."""
    path = Path(path)
    if path.exists():
        return path
    return find_shipped(path, training_only=True) or path


def copy_recipe(name: str, dest: str | Path) -> Path:
    """Copy the shipped recipe NAME to DEST (a file, or an existing folder); never overwrite. Returns the copy."""
    src = find_shipped(name)
    if src is None:
        names = ", ".join(r.name for r in shipped_recipes())
        raise LvitError(f"no shipped recipe named {name!r}. The shipped ones (`lvit recipes ls`): {names}.")
    dest_text = str(dest)
    dest = Path(dest)
    if dest.is_dir():
        target = dest / src.name
    elif dest_text.endswith(("/", "\\")):
        raise LvitError(f"folder {dest} does not exist; create it first (mkdir -p {dest}) or pass a file name.")
    else:
        target = dest if dest.suffix else dest.with_name(dest.name + src.suffix)
    if not target.parent.is_dir():
        raise LvitError(
            f"cannot write {target}: folder {target.parent} does not exist; create it first "
            f"(mkdir -p {target.parent}) or pass another DEST."
        )
    try:
        with target.open("xb") as f:  # "x": fails if the file exists, also if it appeared meanwhile
            f.write(src.read_bytes())
    except FileExistsError:
        raise LvitError(
            f"{target} already exists; lvit never overwrites a file. Pass another DEST "
            f"(e.g. lvit recipes cp {name} my_{src.name}), or delete {target} first."
        ) from None
    return target
