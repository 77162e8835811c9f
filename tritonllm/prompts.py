"""The one prompt-file loader, for benchmark workloads and FP8 calibration alike.

A `.jsonl` file holds one JSON object per line with a non-empty string field "prompt" (a user turn: whoever
tokenizes it applies the chat template) or "text" (used verbatim); any other file holds one prompt per line, each
read as "text". Blank lines are skipped. Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, NamedTuple

JSONL_FORMAT = 'JSONL: one {"prompt": "..."} or {"text": "..."} object per line'


class PromptFileError(ValueError):
    """The prompt file is missing, empty or malformed; the message names the file, the line and what is allowed."""


class Prompt(NamedTuple):
    kind: Literal["prompt", "text"]
    text: str


def read_prompts(path: Path, count: int | None = None) -> list[Prompt]:
    """The prompts of `path` in file order; with `count`, the first `count` of them, which must exist."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist; give a {JSONL_FORMAT} (.jsonl), or a text file "
                              "with one prompt per line")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                records.append(Prompt("text", line.rstrip("\r\n")))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptFileError(f"{path}:{number} is not JSON ({error.msg}); the file must be {JSONL_FORMAT}") \
                    from None
            kind = next((k for k in ("prompt", "text") if isinstance(record, dict) and k in record), None)
            if kind is None or not isinstance(record[kind], str) or not record[kind].strip():
                raise PromptFileError(f'{path}:{number} has no non-empty "prompt" or "text" string field')
            records.append(Prompt(kind, record[kind]))
    if not records:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    if count is not None:
        if count < 1:
            raise PromptFileError(f"prompt count {count} is not allowed; allowed: >= 1")
        if len(records) < count:
            raise PromptFileError(f"prompt file {path} holds {len(records)} prompts, fewer than the {count} asked "
                                  "for; add prompts or ask for fewer")
        records = records[:count]
    return records
