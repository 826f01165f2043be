"""Words the pipeline shows people."""

from __future__ import annotations


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """'1 image', '2 images': counts in English, for the progress line, the run summary and
    the evaluation's messages."""
    return f"{number} {noun}" if number == 1 else f"{number} {plural or noun + 's'}"


def every(number: int, noun: str, plural: str | None = None) -> str:
    """'the one shard', 'all 3 shards': each one of a count, as "... already up to date"
    says it."""
    return f"the one {noun}" if number == 1 else f"all {counted(number, noun, plural)}"


def per_second(rate: float) -> str:
    """A rate as people read it: one decimal from 1 up, two significant digits below, so
    that a slow run (one large raster in half a minute) shows 0.033, not 0.0; from 0.95, which
    two significant digits round to 1, "1.0" as above it."""
    return f"{rate:.1f}" if rate >= 0.95 or rate == 0 else f"{rate:.2g}"


def verb_for(number: int, singular: str, plural: str) -> str:
    """The verb that agrees with a count: `verb_for(1, "is", "are")` is "is"."""
    return singular if number == 1 else plural


def score_text(value: float | None, width: int = 0) -> str:
    """An mIoU to 4 places, "-" for one not measured (an epoch without a validation set), as
    the training's epoch lines and its table show them."""
    return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"
