"""`--verify-gguf`: the GGUF files answer as the export does. The export (plain transformers, fp32) and llama.cpp
(`lvit.export.gguf.runtime`) get the same image prompts from the run's data, built with the export's own chat
template and processor; each answers greedily.

- The prompt ids must be equal (llama.cpp tokenizes the template's text itself; images as their token count).
- At f16 / f32 the generated tokens must be equal too: the check fails otherwise, naming the prompt.
- Quantized files are measured, not required to agree: where their greedy answer first departs from transformers'
  (per prompt), and their top-1 agreement, the share of steps at which llama.cpp's most likely next token is
  transformers' when both are fed transformers' answer.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lvit.data.images import ImageLoader
from lvit.data.mixture import checked_source
from lvit.export.gguf.runtime import LlamaCpp
from lvit.export.selfcheck import SYNTHETIC_QUESTION, image_records, synthetic_image
from lvit.templates.conversation import Conversation, chat_messages

log = logging.getLogger(__name__)

PROMPTS = 8
MAX_NEW_TOKENS = 16
# The largest difference between llama.cpp's and transformers' image rows, relative to their largest value, that
# the check accepts at f16/f32. llama.cpp computes GELU from an fp16 table (its CPU code), the tanh form in the
# projector, and the matrices in f16: 0.45% was measured on the tests' tiny SigLIP model. A wrong tower or
# projector moves them by about their whole size (98% for llama.cpp's CLIP class-token order, see
# docs/stack-notes.md#llama-cpp-clip-class-token).
EMBEDDING_TOLERANCE = 0.02


@dataclass
class Prompt:
    where: str
    messages: list
    images: list


@dataclass
class Reference:
    prompt_ids: list[int]
    tokens: list[int]
    margin: float
    """The smallest gap between transformers' two most likely tokens along its answer (fp32 logits)."""
    features: list = field(default_factory=list)
    """Per image: the rows transformers gives the language model for it (the projector's output)."""


@dataclass
class Agreement:
    model: str
    exact_required: bool
    prompts: int = 0
    prompt_ids_equal: int = 0
    answers_equal: int = 0
    first_difference: list = field(default_factory=list)
    """Per prompt: the first position where llama.cpp's answer departs from transformers' (None: equal)."""
    top1_agreement: float = 1.0
    image_difference: float = 0.0
    """The largest |llama.cpp - transformers| of the image rows, relative to transformers' largest |value|."""

    @property
    def ok(self) -> bool:
        equal = self.prompt_ids_equal == self.answers_equal == self.prompts
        return not self.exact_required or (equal and self.image_difference <= EMBEDDING_TOLERANCE)

    def row(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def load_export(folder: Path):
    """`(model, processor)`: the export as written, in fp32, as plain transformers loads it."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


def check_prompts(run, processor, image_size: int, n: int = PROMPTS) -> list[Prompt]:
    """Up to `n` image prompts: the first user turn of the run's one-image records (their images as training loads
    them), else a synthetic image of `image_size` pixels and a fixed question."""
    data = checked_source(run.recipe.data, str(run.path))
    loader = ImageLoader(processor.image_processor, data.image_folder, data.image_aspect_ratio)
    prompts = []
    for record in image_records(data):
        if len(record.images) != 1 or not record.conversation.turns:
            continue
        conv = Conversation(turns=record.conversation.turns[:1], has_image=True, system=record.conversation.system)
        try:
            image = loader.load(record.images[0])
        except Exception:  # an unreadable image: the next record
            continue
        prompts.append(Prompt(f"record {record.id!r}", chat_messages(conv, image), [image]))
        if len(prompts) == n:
            break
    if not prompts:
        image = synthetic_image(image_size)
        conv = Conversation(turns=[("user", SYNTHETIC_QUESTION)], has_image=True)
        prompts.append(Prompt("a synthetic image", chat_messages(conv, image), [image]))
    return prompts


def references(
    model, processor, prompts: list[Prompt], max_new_tokens: int = MAX_NEW_TOKENS, ignore_eos: bool = False
) -> tuple[list, dict]:
    """transformers' greedy answers (`load_export`'s model) and what the llama.cpp side needs to build the same
    prompts: the template's text per prompt, the image token id, the stop ids, the BOS text. `ignore_eos`: every
    answer runs `max_new_tokens` long, past the end of turn (a longer comparison of the same computation)."""
    import torch

    eos = model.generation_config.eos_token_id
    stop = set() if ignore_eos else set(eos if isinstance(eos, list) else [eos])
    refs, texts = [], []
    for prompt in prompts:
        inputs = processor.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=processor.tokenizer.pad_token_id,
                eos_token_id=sorted(stop) or None,
            )
            features = image_rows(model, inputs["pixel_values"])
        new = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        margins = [float(torch.topk(s[0].float(), 2).values.diff().abs()) for s in out.scores]
        refs.append(Reference(inputs["input_ids"][0].tolist(), new, min(margins) if margins else 0.0, features))
        texts.append(processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False))
    side = {
        "texts": texts,
        "image_token": processor.image_token,
        "image_token_id": model.config.image_token_id,
        "stop": stop,
        "bos": processor.tokenizer.bos_token,
    }
    return refs, side


def image_rows(model, pixel_values) -> list:
    """Per image, the projector's output rows: what the language model receives in place of its tokens."""
    out = model.model.get_image_features(pixel_values=pixel_values)
    out = getattr(out, "pooler_output", out)
    rows = list(out) if isinstance(out, list | tuple) else [out[i] for i in range(out.shape[0])]
    return [r.reshape(-1, r.shape[-1]).float().numpy() for r in rows]


def compare(model_path: Path, mmproj: Path, prompts, refs, side, exact: bool, images: bool = True) -> Agreement:
    """llama.cpp's answers with `model_path` + `mmproj` against transformers' (`references`); `images`: also compare
    the image rows (they depend on the mmproj only, so once per mmproj is enough)."""
    agreement = Agreement(model_path.name, exact)
    forced_total = forced_same = 0
    with LlamaCpp(model_path, mmproj) as llm:
        for prompt, ref, text in zip(prompts, refs, side["texts"], strict=True):
            bos = side["bos"]
            add_special = bool(bos) and text.startswith(bos)  # llama.cpp adds the BOS itself, as a server does
            if add_special:
                text = text[len(bos) :]
            text = text.replace(side["image_token"], llm.marker())
            got = llm.generate(
                text, prompt.images, side["image_token_id"], len(ref.tokens), side["stop"], ref.tokens, add_special
            )
            agreement.prompts += 1
            agreement.prompt_ids_equal += got.prompt_ids == ref.prompt_ids
            agreement.answers_equal += got.tokens == ref.tokens
            diff = next((i for i, (a, b) in enumerate(zip(got.tokens, ref.tokens, strict=False)) if a != b), None)
            if diff is None and len(got.tokens) != len(ref.tokens):
                diff = min(len(got.tokens), len(ref.tokens))
            agreement.first_difference.append(diff)
            for image, rows in zip(prompt.images, ref.features if images else [], strict=False):
                mine = llm.image_embeddings(image)
                scale = float(abs(rows).max()) or 1.0
                gap = float(abs(mine - rows).max()) / scale if mine.shape == rows.shape else float("inf")
                agreement.image_difference = max(agreement.image_difference, gap)
            forced_total += len(got.forced_top1)
            forced_same += sum(a == b for a, b in zip(got.forced_top1, ref.tokens, strict=False))
            if got.prompt_ids != ref.prompt_ids:
                log.warning(
                    "gguf check (%s), %s: llama.cpp's prompt ids differ from transformers': %s vs %s",
                    model_path.name,
                    prompt.where,
                    got.prompt_ids[:40],
                    ref.prompt_ids[:40],
                )
    agreement.top1_agreement = forced_same / forced_total if forced_total else 1.0
    return agreement
