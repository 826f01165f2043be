"""Words the pipeline shows people."""

from __future__ import annotations


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """'1 image', '2 images': counts in English, for the progress line, the run summary and
    the evaluation's messages."""
    return f"{number} {noun}" if number == 1 else f"{number} {plural or noun + 's'}"
