"""Answers from a trained model, built with the same template pieces as training.

- `load_model`: any lvit run folder or checkpoint (stage 1, full, LoRA, QLoRA; through
  `lvit.runs.load_trained`) or a stock LLaVA folder (an `lvit export`, or any
  `LlavaForConditionalGeneration` checkpoint), with the template it was trained with.
- `generate_answers` / `iter_answers`: batched generation with left padding; a batch gives the
  same answers as one conversation at a time.
- `read_questions` + `generate_file`: `lvit generate`, resumable JSONL answer files.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lvit.errors import LvitError
from lvit.templates import Conversation, ConversationEncoder

log = logging.getLogger("lvit")

DEFAULT_TEMPLATE = "vicuna_v1"


# --- settings and loading --------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """How answers are decoded: greedy unless `temperature` > 0."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0

    def kwargs(self) -> dict:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise LvitError(f"--temperature must be >= 0 and --top-p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.max_new_tokens < 1:
            raise LvitError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


@dataclass
class LoadedModel:
    """A model ready to answer: the model, its processor and the pieces that build its prompts."""

    model: object
    processor: object
    template: str
    aspect_ratio: str
    description: str

    def encoder(self) -> ConversationEncoder:
        config = self.model.config
        return ConversationEncoder(
            self.template, self.processor.tokenizer, config.image_token_id, image_tokens_per_image(config)
        )

    def image_loader(self, image_folder: str | Path | None = None):
        from lvit.data.images import ImageLoader

        return ImageLoader(self.processor.image_processor, image_folder, self.aspect_ratio)


def image_tokens_per_image(config) -> int:
    """How many image-token ids stand for one image in this LLaVA config."""
    from lvit.model import num_image_tokens

    n = num_image_tokens(config.vision_config)
    return n + 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else n


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str | Path, load_4bit: bool = False, device: str | None = None) -> LoadedModel:
    """Load a run folder, a checkpoint or an exported / stock LLaVA folder for generation.

    `load_4bit` loads the language model in 4-bit NF4 (full runs and exported folders; a QLoRA run
    is 4-bit already).
    """
    from lvit.model import RUN_INFO_FILE

    path = Path(path)
    if not path.is_dir():
        raise LvitError(f"{path}: no such folder; pass an lvit run folder, a checkpoint or an exported LLaVA folder.")
    device = device or default_device()
    if (path / RUN_INFO_FILE).is_file() or any(path.glob("checkpoint-*")):
        return _load_run(path, load_4bit, device)
    return _load_llava_folder(path, load_4bit, device)


def _load_run(path: Path, load_4bit: bool, device: str) -> LoadedModel:
    from lvit.runs import load_trained, read_run

    run = read_run(path)
    if load_4bit and run.kind in ("align", "lora"):
        raise LvitError(
            f"--load-4bit works on full runs and exported folders; {path} is a {run.kind!r} run. "
            f"Export it first (`lvit export {path} --out DIR`) and load that folder with --load-4bit."
        )
    if load_4bit and run.kind == "full":
        loaded = _load_llava_folder(path, True, device)
        loaded.template, loaded.aspect_ratio = run.recipe.data.template, run.recipe.data.image_aspect_ratio
        loaded.description = f"{path} (full run, language model loaded in 4-bit)"
        return loaded
    model, processor, run = load_trained(path)
    if run.kind == "qlora":
        from lvit.quant import disable_cpu_repacking

        disable_cpu_repacking(model)  # what load_lm_4bit does; kept in case a later step trains this model
    model.to(device)
    if run.kind == "align":
        log.warning("%s is a stage-1 (align) run: it answers every prompt with a caption of the image", path)
    return LoadedModel(
        model, processor, run.recipe.data.template, run.recipe.data.image_aspect_ratio, f"{path} ({run.kind} run)"
    )


def _load_llava_folder(path: Path, load_4bit: bool, device: str) -> LoadedModel:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lvit.export import EXPORT_INFO_FILE  # what `lvit export` writes about itself (its run's recipe)

    if not (path / "config.json").is_file():
        raise LvitError(
            f"{path} is neither an lvit run folder (no lvit_run.json) nor a Hugging Face model folder (no config.json)."
        )
    kwargs: dict = {}
    if load_4bit:
        kwargs.update(quantization_config=_bnb_config_for_llava(), device_map={"": 0 if device == "cuda" else device})
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise LvitError(f"{path}: cannot be loaded as a LLaVA model with its processor: {exc}") from None
    if not load_4bit:
        model.to(device)
    model.eval()
    template, aspect_ratio = DEFAULT_TEMPLATE, "square"
    info_path = path / EXPORT_INFO_FILE
    if info_path.is_file():
        data = (json.loads(info_path.read_text()).get("recipe") or {}).get("data") or {}
        template, aspect_ratio = data.get("template", template), data.get("image_aspect_ratio", aspect_ratio)
    return LoadedModel(
        model, processor, template, aspect_ratio, f"{path} (LLaVA folder{', 4-bit' if load_4bit else ''})"
    )


def _bnb_config_for_llava():
    import transformers

    # The language model in 4-bit NF4 (QLoRA's data type); CLIP, the projector and the LM head stay in 16/32 bit.
    # llm_int8_skip_modules matches full paths (STACK-NOTES: bare names are silently ignored).
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    )


# --- generation ------------------------------------------------------------------------------------------------------


def _model_device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    param = next(llava.model.vision_tower.parameters())
    return param.device, param.dtype


@contextmanager
def eval_mode(model):
    """Eval mode inside, each module's own train/eval mode restored after (a frozen tower may be in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def generate_batch(
    model,
    encoder: ConversationEncoder,
    image_loader,
    convs: list[Conversation],
    image_paths: list[str | None],
    settings: GenerationSettings,
    streamer=None,
    pixel_values: torch.Tensor | None = None,
) -> list[str]:
    """Answer the last user turn of each conversation in one `generate` call, left-padded.

    The caller puts the model in eval mode. `pixel_values` may be passed instead of loading the
    images (one row per conversation that has an image).
    """
    tokenizer = encoder.tokenizer
    device, dtype = _model_device_and_dtype(model)
    encoded = encoder.encode_many(convs, for_generation=True)
    width = max(len(e.input_ids) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(e.input_ids)) + e.input_ids for e in encoded])
    attention = torch.tensor([[0] * (width - len(e.input_ids)) + [1] * len(e.input_ids) for e in encoded])
    kwargs = {}
    if pixel_values is None:
        images = [image_loader.load(p) for p in image_paths if p is not None]
        if images:
            pixel_values = image_loader.pixel_values(images)
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values.to(device=device, dtype=dtype)
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        streamer=streamer,
        **settings.kwargs(),
        **kwargs,
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, width:]]


def iter_answers(
    model,
    encoder: ConversationEncoder,
    image_loader,
    convs: list[Conversation],
    image_paths: list[str | None],
    settings: GenerationSettings,
    batch_size: int = 16,
) -> Iterator[tuple[int, list[str]]]:
    """Yield `(start, answers)` per batch, in order; the model is put in eval mode and every module's
    train/eval mode is restored after."""
    with eval_mode(model):
        for start in range(0, len(convs), batch_size):
            answers = generate_batch(
                model,
                encoder,
                image_loader,
                convs[start : start + batch_size],
                image_paths[start : start + batch_size],
                settings,
            )
            yield start, answers


def generate_answers(
    model,
    encoder: ConversationEncoder,
    image_loader,
    convs: list[Conversation],
    image_paths: list[str | None],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """Answer the last user turn of each conversation (greedy by default), in batches with left padding.

    Each conversation's turns end with the user turn to answer; `image_paths[i]` is its image
    (or None). Returns the decoded answers, stripped.
    """
    settings = GenerationSettings(max_new_tokens, temperature, top_p)
    answers: list[str] = []
    for _, chunk in iter_answers(model, encoder, image_loader, convs, image_paths, settings, batch_size):
        answers += chunk
    return answers


# --- question files --------------------------------------------------------------------------------------------------


@dataclass
class Question:
    id: str
    conversation: Conversation
    """Ends with the user turn to answer; earlier turns are the history."""
    image: str | None
    reference: str | None = None
    """The record's trailing assistant turn, when it had one."""

    @property
    def prompt(self) -> str:
        return self.conversation.turns[-1][1]


def read_questions(path: str | Path) -> list[Question]:
    """Read a question file in any format `lvit.data.records.read_records` reads.

    The last user turn of each record is the question; a trailing assistant turn, if present, is
    the reference answer. Raises `LvitError` naming the records that cannot be used.
    """
    from lvit.data.records import read_records

    records, problems, _ = read_records(path)
    if any(p.kind == "ends_with_user" for p in problems):
        # Training data must end with an answer; a question need not: read those records again with a stand-in.
        records, problems = _with_unanswered(path, records, problems)
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise LvitError(f"{path}: {len(problems)} record(s) cannot be used as questions:\n{listed}{more}")
    questions, seen = [], set()
    for record in records:
        turns = list(record.conversation.turns)
        reference = turns.pop()[1] if turns[-1][0] == "assistant" else None
        if reference == _STAND_IN:
            reference = None
        if record.id in seen:
            raise LvitError(f"{path}: id {record.id!r} appears more than once; answers are matched to questions by id.")
        seen.add(record.id)
        conv = Conversation(turns=turns, has_image=record.image is not None, system=record.conversation.system)
        questions.append(Question(record.id, conv, record.image, reference))
    if not questions:
        raise LvitError(f"{path}: no questions in the file.")
    return questions


_STAND_IN = "\x00unanswered\x00"


def _with_unanswered(path, records, problems):
    """Records that failed only for ending with a user turn, read again with a stand-in answer (any format)."""
    from lvit.data.records import RecordError, load_rows, normalise, normalise_chat

    _, schema, raws, lines, _ = load_rows(Path(path))
    norm = normalise_chat if schema == "chat" else normalise
    records, kept = list(records), []
    for problem in problems:
        if problem.kind != "ends_with_user" or problem.index is None:
            kept.append(problem)
            continue
        raw = dict(raws[problem.index])
        if schema == "chat":
            raw["messages"] = [*raw["messages"], {"role": "assistant", "content": _STAND_IN}]
        else:
            raw["conversations"] = [*raw["conversations"], {"from": "gpt", "value": _STAND_IN}]
        try:
            records.append(norm(raw, problem.index, lines[problem.index]))
        except RecordError as exc:
            kept.append(exc)
    return sorted(records, key=lambda r: r.index), kept


def read_answer_file(path: str | Path, repair: bool = False) -> dict[str, dict]:
    """Rows of a JSONL answer file by id. A cut-off last line (an interrupted run) is tolerated and,
    with `repair`, removed from the file; a bad line anywhere else is an error."""
    path = Path(path)
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    data = path.read_bytes()
    lines = data.split(b"\n")
    good_end = 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            good_end += len(line) + (0 if last else 1)
            continue
        try:
            row = json.loads(line)
            key = str(row["id"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            if last:  # an interrupted write: no newline after it
                log.warning("%s: ignoring a cut-off last line (an interrupted run); it is generated again", path)
                if repair:
                    with path.open("r+b") as f:
                        f.truncate(good_end)
                break
            raise LvitError(
                f"{path}:{i + 1}: not a JSON answer row with an 'id'; fix or remove the line to resume."
            ) from None
        rows[key] = row
        good_end += len(line) + (0 if last else 1)
    return rows


def generate_file(
    loaded: LoadedModel | Callable[[], LoadedModel],
    questions: list[Question],
    out: str | Path,
    image_folder: str | Path | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, dict]:
    """Answer `questions` into the JSONL file `out`, skipping ids already answered there.

    Each line: `{"id", "prompt", "answer", "reference"?, "image"?}`. Lines are appended and flushed
    batch by batch, so an interrupted run resumes where it stopped. `loaded` may be a function that
    loads the model, called only when something is left to answer. Returns all rows by id.
    """
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    out = Path(out)
    done = read_answer_file(out, repair=True)
    todo = [q for q in questions if q.id not in done]
    stale = [q.id for q in questions if q.id in done and done[q.id].get("prompt", q.prompt) != q.prompt]
    if stale:
        raise LvitError(
            f"{out} already answers {len(stale)} of these ids for a different question (e.g. {stale[0]!r}); "
            "write to another file, or remove it to start over."
        )
    if done:
        log.info(
            "%s: %d of %d questions already answered; generating the other %d",
            out,
            len(questions) - len(todo),
            len(questions),
            len(todo),
        )
    check_images(todo, image_folder)
    if not todo:
        return done
    if not isinstance(loaded, LoadedModel):
        loaded = loaded()
    loader = loaded.image_loader(image_folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with out.open("ab") as f:
            f.write(b"\n")
    encoder = loaded.encoder()
    bar = tqdm(total=len(todo), desc="generating", unit="q", disable=not progress, file=sys.stderr)
    with out.open("a", encoding="utf-8") as f:
        batches = iter_answers(
            loaded.model, encoder, loader, [q.conversation for q in todo], [q.image for q in todo], settings, batch_size
        )
        for start, answers in batches:
            for q, answer in zip(todo[start : start + len(answers)], answers, strict=True):
                row = answer_row(q, answer)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[q.id] = row
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(answers))
    bar.close()
    return done


def answer_row(question: Question, answer: str) -> dict:
    row = {"id": question.id, "prompt": question.prompt, "answer": answer}
    if question.reference is not None:
        row["reference"] = question.reference
    if question.image is not None:
        row["image"] = question.image
    return row


def check_images(questions: list[Question], image_folder: str | Path | None) -> None:
    """Fail before generating when an image is missing (not after hours of generation)."""
    from lvit.data.images import describe_image, image_exists

    missing = [q for q in questions if q.image is not None and not image_exists(q.image, image_folder)]
    if missing:
        raise LvitError(
            f"{len(missing)} question image(s) not found, e.g. {missing[0].id!r}: "
            f"{describe_image(missing[0].image, image_folder)}. "
            "Pass --image-folder, the folder the data's image paths are relative to."
        )
