"""Data: from the files a user has to the batches the model trains on, one step a module.

1. `sources`: JSON / JSON Lines files and Hugging Face datasets -> raw rows, each with its line
   number (`load_rows`); a Hugging Face dataset stays a memory-mapped `datasets.Dataset`
   (`HFSource`), its embedded images undecoded (`EmbeddedImage`).
2. `records`: raw rows -> normalised `Record`s, or `RecordError`s that name the record and say how to
   fix it (`read_records`, the one entry point; LLaVA and chat schemas).
3. `check`: every problem of a dataset (`inspect_data`): images, duplicate ids, lengths in tokens
   (measured by `lvit.templates.encoder.ConversationEncoder.lengths`) against `data.max_length`;
   `check_data` is `lvit data check`. `report` renders what it found (`CheckReport`: text, JSON,
   length percentiles and histogram).
4. `dataset`: the training dataset (`prepare`), `data.on_bad_record`, `skipped_records.jsonl`;
   `shared`: under several processes, `prepare` on rank 0 only and its records on every rank (`prepare_once`).
5. `collator`: training rows -> batches (`LlavaCollator`), images decoded in the workers, stacked
   in the order of their image tokens (several per record allowed); padded rows, or with `data.packing`
   padding-free rows laid out by `packing` (samples end to end, positions from 0 per sample).

The batch order: `modality_sampler` (LLaVA-1.5's single-modality steps, `data.group_by_modality_length`).

Beside the pipeline: `images` (any image mode to RGB, EXIF orientation, `pad`; checking one image),
`convert` and `scienceqa` (`lvit data convert`), `cli` (the `lvit data` commands).
"""
