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
Loading any of these folders (or a stock LLaVA folder) as a model is `lvit.infer.load`.
"""
