"""Write the JSON Schema of every message to ``schemas/json/`` (``python -m schemas.export``).

The checked-in files are the contract other languages and reviewers read; a test
fails when they fall behind the models, so run this after changing a message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.messages import MESSAGE_TYPES

JSON_DIR = Path(__file__).parent / "json"


def rendered() -> dict[str, str]:
    """File name → exact file content, for every message type."""
    return {
        f"{message_type}.json": json.dumps(
            cls.model_json_schema(mode="validation"), indent=2, sort_keys=True
        )
        + "\n"
        for message_type, cls in sorted(MESSAGE_TYPES.items())
    }


def stale_files(directory: Path = JSON_DIR) -> list[str]:
    """Names of files that are missing, different or no longer produced."""
    wanted = rendered()
    present = {path.name for path in directory.glob("*.json")}
    changed = [
        name
        for name, text in wanted.items()
        if not (directory / name).exists() or (directory / name).read_text() != text
    ]
    return sorted(changed + sorted(present - wanted.keys()))


def write(directory: Path = JSON_DIR) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    wanted = rendered()
    for path in directory.glob("*.json"):
        if path.name not in wanted:
            path.unlink()
    for name, text in wanted.items():
        (directory / name).write_text(text)
    return len(wanted)


if __name__ == "__main__":
    count = write()
    print(f"wrote {count} schemas to {JSON_DIR}", file=sys.stderr)
