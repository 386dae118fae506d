"""The data engine's reply parser on the team's reply corpus: the acceptance table, and every miss by name.

.venv/bin/python benchmarks/reply_corpus.py [tests/fixtures/replies/corpus.yaml]
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import yaml

from lvit.data.generate import load_prompts
from lvit.data.generate.corpus import grade, table

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "tests/fixtures/replies/corpus.yaml")
corpus = yaml.safe_load(path.read_text(encoding="utf-8"))
graded = [grade(entry, load_prompts()) for entry in corpus]
print(f"{path}: {len(corpus)} replies ({dict(Counter(e['verdict'] for e in corpus))})\n")
print(table(graded))
for g in graded:
    if g.outcome != "right":
        print(f"- {g.name}: {g.outcome} ({g.detail})")
