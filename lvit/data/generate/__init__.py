"""The paper's data engine: instruction-following data written by a text-only LLM from captions and boxes.

LLaVA paper (Liu et al., 2023, "Visual Instruction Tuning"), Sec. 3: a text-only LLM reads each image's
captions and object boxes, never the pixels, and writes three kinds of data: conversations, detailed
descriptions and complex reasoning. `lvit data generate` does this with any OpenAI-compatible endpoint.

- `contexts`: the input (COCO annotation files or JSON Lines) -> `ImageContext` (captions, boxes);
- `prompts`: the prompt sets (system message, few-shot examples), shipped in `lvit/data/prompts/`;
- `parse`: the reply -> turns, or a rejection with its reason;
- `run`: the plan, the requests (`lvit.llm.endpoint`), the output and rejects files, resumption, the summary.
"""

from lvit.data.generate.contexts import ImageContext, read_coco, read_jsonl
from lvit.data.generate.parse import Rejected, parse_reply
from lvit.data.generate.prompts import KINDS, load_prompts
from lvit.data.generate.run import PAPER_MIX, Summary, generate, parse_mix, plan

__all__ = [
    "KINDS",
    "PAPER_MIX",
    "ImageContext",
    "Rejected",
    "Summary",
    "generate",
    "load_prompts",
    "parse_mix",
    "parse_reply",
    "plan",
    "read_coco",
    "read_jsonl",
]
