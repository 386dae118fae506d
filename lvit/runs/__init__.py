"""The run folder: every file lvit writes for a run, its checkpoints and its exports, and reading them back.

```
runs/stage2/                     training.output_dir
  lvit_recipe.yaml               the recipe, every override applied          (RECIPE_FILE)
  lvit_run.json                  stage, method, parts, metrics; written last: a finished run  (RUN_INFO_FILE)
  preprocessor / tokenizer files the processor (image processor + tokenizer + chat template)
  weights, by kind:
    align (stage 1)              projector.safetensors + config.json        (PROJECTOR_FILE)
    full                         model.safetensors (or shards + index): a stock LLaVA checkpoint
    lora / qlora                 adapter_model.safetensors + adapter_config.json: the LoRA weights and
                                 the fully trained projector (peft's modules_to_save)
  skipped_records.jsonl          records left out of training (written by lvit.data.dataset)
  eval/                          evaluation during training (lvit.eval.callback)
  checkpoint-N/                  the Trainer's checkpoint (weights, optimizer, scheduler, RNG states,
                                 trainer_state.json (TRAINER_STATE_FILE), written after the rest) plus
                                 the recipe, run info and processor: each one resumes, exports and
                                 answers on its own. A stage-1 checkpoint holds the whole model.
  incomplete-checkpoint-N/       a checkpoint cut off while saving, set aside on resume
```

An export (`lvit export`) is a stock LLaVA folder (or, with `--projector-only`, `projector.safetensors`
plus the run's recipe and run info) with `lvit_export.json` (EXPORT_INFO_FILE: the self-check and the
run's recipe) and a model card `README.md` (MODEL_CARD_FILE).

For stage 1 and adapters the frozen base is rebuilt from the recipe's `model` section (the same
deterministic assembly the run used), so the base parts must still be reachable.

- `lvit.runs.files`: the names, `RunFolder` / `read_run`, and the writers and readers of each file;
- `lvit.runs.resume`: which checkpoint an interrupted run resumes from;
- `lvit.runs.load`: any of these folders (or a stock LLaVA folder) as a model: as trained, merged,
  or ready for generation.
"""

from lvit.runs.files import (
    EXPORT_INFO_FILE,
    LOG_FILE,
    MODEL_CARD_FILE,
    PLOT_FILE,
    PROJECTOR_FILE,
    RECIPE_FILE,
    RUN_INFO_FILE,
    SKIPPED_FILE,
    TRAINER_STATE_FILE,
    WEIGHT_FILES,
    RunFolder,
    copy_run_files,
    is_finished_run,
    is_run_folder,
    model_weight_files,
    read_export_info,
    read_projector,
    read_run,
    read_trainer_state,
    run_info,
    write_export_info,
    write_projector,
    write_run_files,
)
from lvit.runs.load import LoadedModel, load_merged, load_model, load_trained
from lvit.runs.resume import checkpoints, incomplete_reason, resume_checkpoint, set_aside_incomplete

__all__ = [
    "EXPORT_INFO_FILE",
    "LOG_FILE",
    "MODEL_CARD_FILE",
    "PLOT_FILE",
    "PROJECTOR_FILE",
    "RECIPE_FILE",
    "RUN_INFO_FILE",
    "SKIPPED_FILE",
    "TRAINER_STATE_FILE",
    "WEIGHT_FILES",
    "LoadedModel",
    "RunFolder",
    "checkpoints",
    "copy_run_files",
    "incomplete_reason",
    "is_finished_run",
    "is_run_folder",
    "load_merged",
    "load_model",
    "load_trained",
    "model_weight_files",
    "read_export_info",
    "read_projector",
    "read_run",
    "read_trainer_state",
    "resume_checkpoint",
    "run_info",
    "set_aside_incomplete",
    "write_export_info",
    "write_projector",
    "write_run_files",
]
