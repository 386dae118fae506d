"""`lvit recipes`: the recipes that ship inside the package."""

from __future__ import annotations

from pathlib import Path

import typer

# --- the shipped recipes ----------------------------------------------------------------------------------------------

recipes_app = typer.Typer(
    help="The recipes that ship with lvit: list them, copy one to edit it. `lvit finetune NAME` runs one as it is.",
    no_args_is_help=True,
)


@recipes_app.command("ls")
def recipes_ls() -> None:
    """One line per shipped recipe: its name and what it is (training recipes, then accelerate launch configs)."""
    from lvit.recipe.catalog import shipped_recipes

    recipes = shipped_recipes()
    width = max(len(r.name) for r in recipes)
    for r in recipes:
        typer.echo(f"{r.name:<{width}}  {r.description}".rstrip())


@recipes_app.command("cp")
def recipes_cp(
    name: str = typer.Argument(..., help="A shipped recipe, with or without .yaml (see `lvit recipes ls`)."),
    dest: Path = typer.Argument(
        ..., help="A file to create (.yaml added when it has no suffix) or an existing folder. Never overwritten."
    ),
) -> None:
    """Copy the shipped recipe NAME to DEST, to edit it and run it with `lvit finetune DEST`."""
    from lvit.recipe.catalog import copy_recipe

    target = copy_recipe(name, dest)
    typer.echo(f"copied {name} to {target}")
