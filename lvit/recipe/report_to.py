"""`training.report_to`: the integrations transformers reports to and the packages each needs, checked before any
model loads."""

from __future__ import annotations

from lvit.errors import LvitError
from lvit.recipe.schema import Recipe

# training.report_to: for each integration transformers reports to, the modules it needs (any one of them, as
# transformers' `is_*_available` look for them) and what to install. Source: transformers 5.24
# `integrations/integration_utils.py` (`INTEGRATION_TO_CALLBACK`, `get_available_reporting_integrations`).
_INTEGRATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), 'pip install "lvit[tensorboard]"'),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet-ml"),
    "neptune": (("neptune",), "pip install neptune"),
    "trackio": (("trackio",), "pip install trackio"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
    "clearml": (("clearml",), "pip install clearml"),
    "dagshub": (("dagshub",), "pip install dagshub mlflow"),
    "flyte": (("flytekit",), "pip install flytekit"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "azure_ml": (("azureml",), "pip install azureml-core"),
}


def check_report_to(recipe: Recipe) -> None:
    """Raise `LvitError` when `training.report_to` names an integration that is unknown or whose package is not
    installed (the Trainer would fail only after the models load). `"none"` reports nowhere and `"all"` to
    every installed integration, as in transformers: neither can fail."""
    import importlib.util

    value = recipe.training.get("report_to", "none")
    names = [value] if isinstance(value, str) else list(value or [])
    if names in ([], ["none"], ["all"]):
        return
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise LvitError(
                f"{recipe.source}: training.report_to names {name!r}, which transformers does not report to; use "
                f"'none', 'all' or some of: {', '.join(INTEGRATION_TO_CALLBACK)}."
            )
        modules, install = _INTEGRATIONS.get(name, ((), ""))
        if modules and not any(importlib.util.find_spec(m) is not None for m in modules):
            raise LvitError(
                f"{recipe.source}: training.report_to names {name!r}, but its package ({' or '.join(modules)}) is not "
                f"installed: `{install}`, or set `training.report_to=none`."
            )
