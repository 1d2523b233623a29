"""Generated sections of a README: text between a start and an end marker, read and rewritten.

The README's tables that code generates (the serving engines, the defaults) live between such
markers, so a tool can rewrite its table and a test can compare the README's copy with the source.
"""

from pathlib import Path


def marked_section(text: str, start_marker: str, end_marker: str) -> str:
    """What `text` holds between the markers; a ValueError if they are missing."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"README has no {start_marker!r} ... {end_marker!r} markers")
    return text[start + len(start_marker):end].strip("\n") + "\n"


def replace_marked_section(path, start_marker: str, end_marker: str, body: str) -> bool:
    """Rewrite what the file at `path` holds between the markers with `body`; True when it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    marked_section(text, start_marker, end_marker)  # checks the markers
    head, rest = text.split(start_marker, 1)
    tail = rest.split(end_marker, 1)[1]
    new_text = f"{head}{start_marker}\n{body}{end_marker}{tail}"
    path.write_text(new_text, encoding="utf-8")
    return new_text != text
