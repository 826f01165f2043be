"""An exception's chain: what it was raised from, and what it was raised while handling; and
the errors the command line tells apart without importing what raises them."""

from __future__ import annotations

from collections.abc import Iterator


def error_chain(error: BaseException | None, *, implicit: bool = True) -> Iterator[BaseException]:
    """`error`, then the exception it was raised from (`raise ... from`), and so on, each once.
    With `implicit`, an exception raised while another was handled leads to that one too, as
    a traceback shows it (but where `raise ... from None` cut it off): libraries that wrap a
    network error (s3fs, Ray's Cython calls) often raise theirs that way. Without it, only
    what the code said was the cause: an error met in handling another is not that one."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        if error.__cause__ is not None or not implicit or error.__suppress_context__:
            error = error.__cause__
        else:
            error = error.__context__


class StorageUnavailableError(RuntimeError):
    """Storage kept failing through every retry (`storage.retry_io`): the run stops (nothing
    more is committed) and the next run resumes from the shards committed so far."""
