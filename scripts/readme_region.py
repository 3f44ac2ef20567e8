"""A generated region of README.md: the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`.

A script that generates a README table (`limits_table.py`, `hardware_table.py`) names its region and prints the
table, or with `--write` puts it between the region's markers; `tests/unit/test_readme_tables.py` fails while
README.md holds anything else there.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def with_region(readme: str, name: str, body: str) -> str:
    """`readme` with region `name` holding `body` (SystemExit when it has no such region)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {start} … {end} section")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", readme)


def print_or_write(argv: list[str], name: str, body: str) -> None:
    """A generating script's command line: print `body`, or with `--write` put it into README.md's region `name`."""
    if "--write" in argv:
        README.write_text(with_region(README.read_text(), name, body))
    else:
        print(body)
