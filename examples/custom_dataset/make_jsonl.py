"""Turn a CSV of `image,question,answer` rows into LLaVA JSON Lines, one record per row.

    python make_jsonl.py questions.csv data.jsonl

- `image` is a path relative to your image folder (give the folder to lvit as `data.image_folder` /
  `--image-folder`) or an absolute path; leave it empty for a text-only question.
- Each row becomes `{"id", "image", "conversations": [human: "<image>\\n{question}", gpt: "{answer}"]}`.
- Rows with an empty question or answer are reported with their line number and left out.

Edit this script for your own CSV (other column names, several questions per image merged into one
multi-turn record, a system prompt): that is why it is a script and not an lvit option.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

COLUMNS = ("image", "question", "answer")


def rows_to_records(csv_path: Path) -> tuple[list[dict], list[str]]:
    records, problems = [], []
    with csv_path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a BOM from spreadsheet exports
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"{csv_path}: missing column(s) {missing}; the header must be {','.join(COLUMNS)}")
        for row in reader:
            line = reader.line_num
            image, question, answer = (str(row[c] or "").strip() for c in COLUMNS)
            if not question or not answer:
                problems.append(f"{csv_path}:{line}: empty question or answer; row left out")
                continue
            record = {"id": f"row-{line}"}
            if image:
                record["image"] = image
                question = f"<image>\n{question}"
            record["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            records.append(record)
    return records, problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    records, problems = rows_to_records(Path(argv[0]))
    out = Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(records)} records -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
