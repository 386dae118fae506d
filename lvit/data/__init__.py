"""Data: reading records in every format, checking them, loading images, the training dataset and batches.

- `records`: LLaVA JSON/JSONL, the chat format and Hugging Face datasets -> `Record`s (`read_records`).
- `hf`: Hugging Face datasets on disk, images embedded in them read lazily.
- `images`: any image mode to RGB, EXIF orientation, `pad`; checking an image (`probe_image`).
- `check`: `lvit data check` (also run before training): problems, summary, lengths in tokens.
- `dataset`: the training dataset, `data.on_bad_record`, `skipped_records.jsonl`, the collator.
- `convert`, `scienceqa`: `lvit data convert`; `cli`: the `lvit data` commands.
"""
