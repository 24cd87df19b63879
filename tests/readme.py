"""README.md's bash blocks, as the README tests and the quickstart fixture read them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks(text: str = README) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def quickstart_command() -> str:
    """The quickstart's command after ``./install.sh &&`` (the first bash block)."""
    return bash_blocks()[0].strip().split("&& ", 1)[1]
