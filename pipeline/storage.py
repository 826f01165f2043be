"""Object storage through fsspec: every byte the pipeline reads or writes (images, masks,
tables, markers, run records, checkpoints, reports) goes through here: locations, the streamed
listing of a source, shards, retried reads and atomic writes, and removing folders.

Any fsspec URL works (`s3://bucket/prefix`, `gs://...`, a local folder). S3-compatible
endpoints are reached through the standard `AWS_ENDPOINT_URL` / `AWS_*` variables (botocore
reads them) or through `storage_options={"endpoint_url": ...}`.

The listing is streamed one directory at a time, and on S3 one page (1000 keys) at a time, so
the memory it takes does not grow with the archive.

Retries, one layer per kind of failure:
- a transient I/O error (timeout, dropped connection, a 5xx) is retried here, with backoff,
  around each single read, write or listing page (`retry_io`), so a hiccup costs one request;
- a step that still fails is retried whole by Prefect, only for idempotent I/O steps and only
  on transient errors (`flows/_retries.py`, `IO_TASK`);
- a batch lost with a dead Ray replica is sent again by the driver (`pipeline/runtime/driver.py`).
Below all three, the S3 client (botocore, s3fs) retries throttling within a request.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import difflib
import errno
import hashlib
import logging
import os
import posixpath
import re
import shutil
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import fsspec
import fsspec.asyn
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from .errors import StorageUnavailableError, error_chain

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"})
# PNG masks of class ids, and the GeoTIFF masks of georeferenced rasters (read window by window)
MASK_EXTENSIONS = frozenset({".png", ".tif", ".tiff"})
# the images that may be georeferenced rasters, read window by window (`pipeline.rasters`)
RASTER_EXTENSIONS = frozenset({".tif", ".tiff"})
# a chunk grows past --shard-size to keep the keys of one stem together, up to this many times
# it (a.jpg, then a thousand a.<n>.jpg, then a.png): beyond, shards stay bounded, and a.png
# may land in another shard than a.jpg, where the two would write one mask
STEM_CHUNK_LIMIT = 8
ShardBy = Literal["directory", "count"]

# keys of an fsspec info dict that identify one version of an object, best first
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "updated")
_S3_PAGE = 1000


@dataclass(frozen=True)
class Location:
    """A folder-like place given by URL: the filesystem, its root path, and the URL as given.

    Keys are '/'-separated paths relative to the root.
    """

    fs: AbstractFileSystem
    root: str
    url: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def uri(self, key: str) -> str:
        """The key as a URL a user can paste (the absolute path for local folders)."""
        return f"{self.url}/{key}"

    @property
    def bucket(self) -> str:
        """The first part of the root: on object storage, the bucket it lies in."""
        return self.root.split("/", 1)[0]


def folder_exists(location: Location) -> bool:
    """Whether a folder or prefix that lists nothing is there, only empty: a local folder
    that exists; on object storage, where a prefix is only the start of keys and there are no
    folders, one in a bucket that exists (a night nobody uploaded to has no prefix at all)."""
    if location.is_local:
        return os.path.isdir(location.root)
    return bool(retry_io(location.url, location.fs.exists, location.bucket))


def missing_folder(location: Location, what: str) -> str:
    """What to say of `what` (naming `location`) when `folder_exists` says no."""
    if not location.is_local:
        return f"{what}: its bucket {location.bucket} does not exist"
    # `s3:/bucket/key` is a local path to fsspec (made absolute: /cwd/s3:/bucket/key), a slash
    # short of the URL meant
    if (typo := re.search(r"/([a-z][a-z0-9]+):/([^/].*)$", location.root)) and typo[1] in fsspec.available_protocols():
        return f"{what} is not a folder that exists; did you mean {typo[1]}://{typo[2]}?"
    return f"{what} is not a folder that exists"


def is_local_url(url: str) -> bool:
    """Whether `url` names a folder on a filesystem (a path, or file:// or local://)."""
    return fsspec.utils.get_protocol(url) in {"file", "local"}


def absolute_url(url: str) -> str:
    """A path made absolute, so that it names the same file from any working folder (Ray
    Train's workers run in others); a URL with a scheme as it is."""
    return url if "://" in url else os.path.abspath(url)


def open_location(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """The fsspec filesystem and root for `url`; `storage_options` go to remote filesystems
    only, so one set of options serves an S3 source and a local output alike."""
    url = url.rstrip("/") or url
    options = {} if is_local_url(url) else dict(storage_options or {})
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except (ValueError, TypeError, ImportError) as err:
        raise ValueError(f"cannot open {url!r}: {err}") from err
    root = root.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        url = root  # url_to_fs made it absolute
    return Location(fs=fs, root=root, url=url)


def open_file(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Location, str]:
    """A whole-file URL (a checkpoint) as the location of its folder and the file's key there,
    so a single file is read and written the way every object is: `read_bytes`, `write_atomic`."""
    parent, name = parent_folder(open_location(url, storage_options))
    if not name:
        raise ValueError(f"{url!r} names no file (a bucket or a root?); give the URL of a file, e.g. s3://bucket/model.pt")
    return parent, name


def parent_folder(location: Location) -> tuple[Location, str]:
    """The folder that holds `location`, and its name there ("" for a root or a bucket)."""
    parent, slash, name = location.root.rpartition("/")
    if not slash or not name:
        return location, ""
    return Location(fs=location.fs, root=parent, url=location.url.rpartition("/")[0]), name


@dataclass(frozen=True)
class SourceFile:
    """One object of the source: its key relative to the source root, size and version
    (ETag on object stores, mtime on local disks), as recorded in the shard's manifest."""

    key: str
    size: int
    version: str
    # a raster's (`is_raster_key`) only: the image of its stem whose mask is the PNG this
    # raster's would be if it is not georeferenced (a quick-look a.jpg beside a.tif), which
    # it then must not overwrite (`run.plan_shard`); not part of the manifest
    png_mask_taken_by: str | None = None


def is_image_key(key: str) -> bool:
    return posixpath.splitext(key)[1].lower() in IMAGE_EXTENSIONS


def is_mask_key(key: str) -> bool:
    """Whether the key names a mask that evaluation and training read: `MASK_EXTENSIONS`."""
    return posixpath.splitext(key)[1].lower() in MASK_EXTENSIONS


def is_raster_key(key: str) -> bool:
    """Whether the key names a file that is read as a georeferenced raster (GeoTIFF, COG) if
    it has a CRS: by extension, `RASTER_EXTENSIONS`. Plain JPEG and PNG files keep the image
    path (`pipeline.decode`); a TIFF without georeferencing is told apart after opening, by
    `rasters.is_georeferenced`."""
    return posixpath.splitext(key)[1].lower() in RASTER_EXTENSIONS


def _version(info: dict[str, Any]) -> str:
    for name in _VERSION_KEYS:
        if info.get(name) is not None:
            return str(info[name]).strip('"')
    return ""


def _s3_entries(fs: AbstractFileSystem, path: str) -> Iterator[dict[str, Any]]:
    """One directory level of an S3 prefix, a page of 1000 keys at a time; each page request
    is retried on its own (its continuation token asks for the same page again)."""
    # the folder's key sliced from the path as it is, trailing slash and all: a folder may have
    # an empty name (the keys a//b.jpg and /c.jpg), which a normalised path would lose
    bucket = fs.split_path(path)[0]
    rest = path[len(bucket):]  # "" for the bucket itself, else "/" and the folder's key
    yield from _s3_page_entries(fs, bucket, rest[1:] + "/" if rest else "")


def _s3_page_entries(fs: AbstractFileSystem, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """The entries of one level under `prefix` (a folder's key and its slash, or the start of
    names), a page at a time."""
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": _S3_PAGE}
    while True:
        page = retry_io(f"listing s3://{bucket}/{prefix}", fsspec.asyn.sync, fs.loop, fs._call_s3, "list_objects_v2", **request)
        for common in page.get("CommonPrefixes", []):
            # only the delimiter off: the prefix a// is the folder "a/", not "a" again
            yield {"name": f"{bucket}/{common['Prefix'][:-1]}", "type": "directory", "size": 0}
        for item in page.get("Contents", []):
            yield {"name": f"{bucket}/{item['Key']}", "type": "file", "size": item["Size"], "ETag": item.get("ETag")}
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _is_s3(fs: AbstractFileSystem) -> bool:
    return hasattr(fs, "_call_s3") and hasattr(fs, "split_path")


def _entries(fs: AbstractFileSystem, path: str) -> Iterator[dict[str, Any]]:
    """The entries (files and sub-directories) of one directory level, files in name order."""
    if _is_s3(fs):  # streamed page by page
        yield from _s3_entries(fs, path)
        return
    entries = retry_io(f"listing {path}", fs.ls, path, detail=True)
    fs.invalidate_cache(path)  # listings cache would otherwise grow with the archive
    # as S3's: sub-directories named without a trailing slash, and not the directory itself
    # (some filesystems list it in it)
    folders = [entry | {"name": entry["name"].rstrip("/")} for entry in entries if entry.get("type") == "directory"]
    files = [entry for entry in entries if entry.get("type") != "directory"]
    yield from sorted([*(f for f in folders if f["name"] != path.rstrip("/")), *files], key=lambda entry: entry["name"])


def iter_files(location: Location, *, never: Sequence[str] = ()) -> Iterator[tuple[str, SourceFile]]:
    """Every object under the location as (directory key, file), depth first: the files of a
    directory in name order, then its sub-directories in name order. Deterministic for a
    given listing, and the same order on every backend.

    On a local disk, a folder removed between its parent's listing and its own (a retention
    job's) holds nothing, as a prefix emptied on S3 does; and a symbolic link to a folder is
    followed as the folder it names, unless that folder is SOURCE's own, lies in it or in a
    folder already followed (its files are listed where they are; a link back up would never
    end), or holds one of them (a link up to SOURCE's parent would list SOURCE again, and the
    OUTPUT beside it); nor into or above the local folders `never` (OUTPUT: its masks would be
    listed as images)."""
    pending = [location.root]
    prefix = len(location.root) + 1
    followed = _FollowedLinks(location, never) if location.is_local else None
    while pending:
        path = pending.pop()
        subdirs = []
        directory = path[prefix:] if len(path) > len(location.root) else ""
        try:
            for entry in _entries(location.fs, path):
                name = entry["name"]
                if entry.get("type") == "directory":
                    if name != path:  # never the folder again: the listing would not end
                        subdirs.append(name)
                    continue
                if followed is not None and entry.get("islink") and os.path.isdir(name):
                    if followed.follows(name):
                        subdirs.append(name)
                    continue
                if name.endswith("/"):
                    continue  # a zero-byte "folder marker" object
                yield directory, SourceFile(key=name[prefix:], size=int(entry.get("size") or 0), version=_version(entry))
        except FileNotFoundError:
            # a local folder only: a store's "not found" for a folder it listed a moment ago
            # (S3's NoSuchBucket) is no folder removed, and a listing taken as whole without
            # it would remove the results of everything under it
            if path == location.root or not location.is_local:
                raise
            log.info("%s was removed while SOURCE was listed: nothing under it is segmented", path)
        pending.extend(sorted(subdirs, reverse=True))


class _FollowedLinks:
    """Which symbolic links to folders a local listing follows (`iter_files`)."""

    def __init__(self, location: Location, never: Sequence[str]) -> None:
        self.within = [os.path.realpath(folder) for folder in (location.root, *never)]

    def follows(self, link: str) -> bool:
        """Whether to list the folder `link` names (a link to a file is a file, a broken one
        the error row of its image)."""
        target = os.path.realpath(link)
        if any(_within(target, folder) or _within(folder, target) for folder in self.within):
            return False  # listed there, or it would list them again (a link up to SOURCE's parent)
        self.within.append(target)
        return True


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class Shard:
    """A unit of work and of commit: a deterministic id and the files it covers."""

    shard_id: str
    files: tuple[SourceFile, ...]

    def manifest_digest(self) -> str:
        """Changes when any file is added, removed, resized or rewritten."""
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f"{f.key}\t{f.size}\t{f.version}\n".encode())
        return digest.hexdigest()


@dataclass
class ListingCounts:
    """Filled in while shards are streamed: what the listing held besides images."""

    images: int = 0
    skipped: int = 0
    skipped_by_extension: Counter[str] = field(default_factory=Counter)


def shard_id(shard_by: ShardBy, directory: str, index: int) -> str:
    return hashlib.sha256(f"{shard_by}\n{directory}\n{index}".encode()).hexdigest()[:16]


def iter_shards(
    location: Location,
    *,
    shard_by: ShardBy = "directory",
    shard_size: int = 1000,
    counts: ListingCounts | None = None,
    never: Sequence[str] = (),
) -> Iterator[Shard]:
    """Stream the images under `location` as shards.

    "directory": one shard per directory (its images only), split into chunks of `shard_size`
    when bigger. "count": chunks of `shard_size` images in listing order, across directories.
    A chunk is not cut where a later key may still have the stem of one in it (a.jpg ... a.png,
    whose masks may share a path, with a.k.jpg between them in name order), unless it reached
    `STEM_CHUNK_LIMIT` times `shard_size`: so the images of one stem are planned together
    (`run.plan_shard`). A shard's id derives from its directory and chunk index, so the same
    listing always gives the same shards. Keys that are not images are counted in `counts`
    and skipped. `never`: as for `iter_files`.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if shard_by not in ("directory", "count"):
        raise ValueError(f"shard_by must be 'directory' or 'count', got {shard_by!r}")
    counts = counts if counts is not None else ListingCounts()
    batch: list[SourceFile] = []
    group, index = "", 0
    # the stems of the chunk's keys whose names later keys may still begin with (stem and a
    # dot): in name order such keys follow one another, and the blocks nest, so it is a stack
    open_stems: list[str] = []
    for directory, file in iter_files(location, never=never):
        if not is_image_key(file.key):
            counts.skipped += 1
            counts.skipped_by_extension[posixpath.splitext(file.key)[1].lower() or "(none)"] += 1
            continue
        counts.images += 1
        key = directory if shard_by == "directory" else ""
        while open_stems and not file.key.startswith(open_stems[-1] + "."):
            open_stems.pop()
        full = len(batch) >= shard_size * (STEM_CHUNK_LIMIT if open_stems else 1)
        if batch and (key != group or full):
            yield Shard(shard_id(shard_by, group, index), tuple(batch))
            index = index + 1 if key == group else 0
            batch = []
            open_stems.clear()
        group = key
        batch.append(file)
        stem = posixpath.splitext(file.key)[0]
        if not open_stems or open_stems[-1] != stem:
            open_stems.append(stem)
    if batch:
        yield Shard(shard_id(shard_by, group, index), tuple(batch))


def is_case_insensitive(location: Location) -> bool:
    """Whether names differing only in case are the same file there (local folders on macOS
    and Windows by default), found by asking the folder itself, made first if it is not there
    yet (asked where a run is about to write). Object stores never are."""
    if not location.is_local:
        return False
    os.makedirs(location.root, exist_ok=True)
    name = f".segpipe-case-probe-{uuid.uuid4().hex}"
    with open(os.path.join(location.root, name), "wb"):
        pass
    try:
        return os.path.exists(os.path.join(location.root, name.upper()))
    finally:
        os.remove(os.path.join(location.root, name))


# the filesystems that are not local and whose rename replaces a file that is there (sftp's
# posix_rename): on them a write fills a hidden temporary file renamed over the target, as on
# a local disk. On the others a write goes to the target itself: object stores make an upload
# visible whole, in one PUT; elsewhere (smb's rename refuses an existing target, webhdfs's
# fails silently, pyarrow's hdfs deletes it first) a crash leaves part of it there
_RENAME_REPLACES_PROTOCOLS = frozenset({"sftp", "ssh"})


def _protocols(fs: AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _rename_replaces(fs: AbstractFileSystem) -> bool:
    """Whether `fs.mv` over an existing file replaces it in one step (fsspec's DirFileSystem:
    as the filesystem it wraps)."""
    if isinstance(fs, DirFileSystem):
        return isinstance(fs.fs, LocalFileSystem) or _rename_replaces(fs.fs)
    return bool(_protocols(fs) & _RENAME_REPLACES_PROTOCOLS)


def _replace_remote_file(location: Location, key: str, fill: Callable[[str], object]) -> None:
    """`fill` the file at `key` on a filesystem that is not local: through a hidden temporary
    file renamed over it where a rename replaces (`_rename_replaces`), so that a reader sees
    the old file or the new one; else at `key` itself. The temporary file is removed on
    failure."""
    path = location.path(key)
    if not _rename_replaces(location.fs):
        fill(path)
        return
    folder, name = posixpath.split(path)
    temporary = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    retry_io(location.uri(key), location.fs.makedirs, folder, exist_ok=True)  # a folder is made, as on a disk
    try:
        fill(temporary)
        retry_io(location.uri(key), location.fs.mv, temporary, path)
    except BaseException:
        with contextlib.suppress(Exception):
            location.fs.rm_file(temporary)
        raise


def write_atomic(location: Location, key: str, data: bytes) -> None:
    """Write a whole object so that a reader sees the old one or the new one, never part.

    Object stores replace an object in one PUT; on a local disk (and sftp) the bytes go to a
    hidden temporary file (ignored by Parquet readers) renamed over the target. Other
    filesystems are written in place (`_replace_remote_file`).
    """
    path = location.path(key)
    if location.is_local:
        _replace_local_file(path, lambda handle: handle.write(data))
    else:
        _replace_remote_file(location, key, lambda target: retry_io(location.uri(key), location.fs.pipe_file,
                                                                    target, data))


def put_file_atomic(location: Location, key: str, local_path: str | os.PathLike[str]) -> None:
    """Copy a finished local file to `key` so that a reader sees the old object or the new
    one, never part: `write_atomic` for a file too big to hold in memory.

    Object stores make an upload visible only once complete (a multipart upload at its last
    request); it is retried whole on transient errors. On a local disk the file is copied to
    a hidden temporary file beside the target and renamed over it.
    """
    path = location.path(key)
    if not location.is_local:
        _replace_remote_file(location, key, lambda target: retry_io(location.uri(key), location.fs.put_file,
                                                                    os.fspath(local_path), target))
        return

    def copy(handle: BinaryIO) -> None:
        with open(local_path, "rb") as source:
            shutil.copyfileobj(source, handle, length=1 << 20)

    _replace_local_file(path, copy)


def move_atomic(location: Location, source_key: str, key: str) -> None:
    """Move an object to `key` so that a reader of `key` sees the old object or the new one,
    never part: a rename on a local disk (and sftp); on object stores a server-side copy (no
    bytes pass through this process), then the source is deleted."""
    source, path = location.path(source_key), location.path(key)
    if location.is_local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(source, path)
        return
    if _rename_replaces(location.fs):  # a rename there too
        retry_io(location.uri(key), location.fs.makedirs, posixpath.dirname(path), exist_ok=True)
        retry_io(location.uri(key), location.fs.mv, source, path)
        return
    retry_io(location.uri(key), location.fs.copy, source, path)
    with contextlib.suppress(FileNotFoundError):
        retry_io(location.uri(source_key), location.fs.rm_file, source)


def list_folders(location: Location, key: str) -> list[str]:
    """Names of the folders directly under `key`, sorted; none when `key` does not exist.
    Streamed like the source's listing (one page of 1000 keys at a time on S3)."""
    path = location.path(key)
    try:
        entries = list(_entries(location.fs, path))
    except FileNotFoundError:
        return []
    names = (entry["name"].rstrip("/") for entry in entries if entry.get("type") == "directory")
    return sorted(posixpath.basename(name) for name in names if name != path)


def holds_files(location: Location) -> bool:
    """Whether anything at all is listed under `location` (its first page, on S3); True when
    it cannot be listed, for the hints that ask it (a hint never stops a run)."""
    try:
        return next(iter_files(location), None) is not None
    except FileNotFoundError:
        return False
    except (OSError, StorageUnavailableError):
        return True


def similar_folders(location: Location, *, besides: Location) -> list[str]:
    """The URLs of the folders beside `location` whose names are closest to its own, for a
    prefix under which nothing at all is listed: on object storage, where no folder is ever
    missing, the one meant when it was mistyped (`s3://survey/ortho` for `s3://survey/orth`).
    Not a sibling numbered otherwise (`cam4` for `cam3`, a camera that has uploaded nothing
    yet), nor the folder that holds `besides` (the run's OUTPUT, `orth-out`). One listing of
    the parent folder; none when none is close, or it cannot be listed (a hint never stops a
    run)."""
    parent, name = parent_folder(location)
    if not name:
        return []
    try:
        names = list_folders(parent, "")
    except (OSError, StorageUnavailableError):
        return []
    numbered = re.sub(r"\d+", "#", name)
    names = [folder for folder in names if re.sub(r"\d+", "#", folder) != numbered
             and not f"{besides.root}/".startswith(f"{parent.path(folder)}/")]
    return [parent.uri(folder) for folder in difflib.get_close_matches(name, names, n=3)]


def _s3_bucket_and_folder(location: Location) -> tuple[str, str]:
    """An S3 location's bucket and its folder's key in it ("" for the bucket itself)."""
    bucket = location.fs.split_path(location.root)[0]
    return bucket, location.root[len(bucket) + 1:]


def lists_by_prefix(location: Location) -> bool:
    """Whether `files_named_like` asks the store for the names that begin so (S3), rather than
    listing the whole folder."""
    return _is_s3(location.fs)


def files_named_like(location: Location, start: str) -> list[str]:
    """The keys of the files that begin with `start` (a folder's key, a slash, and the start
    of a name) within that folder, sorted: one request with that prefix on S3, the folder's
    listing elsewhere."""
    folder = start.rpartition("/")[0]
    fs = location.fs
    if _is_s3(fs):
        bucket, within = _s3_bucket_and_folder(location)
        entries: Iterable[dict[str, Any]] = _s3_page_entries(fs, bucket, f"{within}/{start}" if within else start)
    else:
        try:
            entries = list(_entries(fs, location.path(folder)))
        except FileNotFoundError:
            return []
    keys = (entry["name"][len(location.root) + 1:] for entry in entries if entry.get("type") != "directory")
    return sorted(key for key in keys if key.startswith(start) and key.rpartition("/")[0] == folder)


def remove_files(location: Location, keys: Sequence[str]) -> None:
    """Delete the files `keys`, those missing included: on S3 in one DeleteObjects request per
    thousand keys (deleting a missing key is no error there), elsewhere one at a time."""
    if not keys:
        return
    if _is_s3(location.fs):
        bucket, within = _s3_bucket_and_folder(location)
        objects = [f"{within}/{key}" if within else key for key in keys]
        for start in range(0, len(objects), _S3_PAGE):
            request = {"Bucket": bucket, "Delete": {"Objects": [{"Key": k} for k in objects[start:start + _S3_PAGE]],
                                                    "Quiet": True}}
            answer = retry_io(f"deleting {len(keys)} files under {location.url}", fsspec.asyn.sync, location.fs.loop,
                              location.fs._call_s3, "delete_objects", **request)
            if failed := answer.get("Errors"):  # per key, in a successful answer (AccessDenied...)
                raise OSError(f"cannot delete s3://{bucket}/{failed[0].get('Key')}: {failed[0].get('Code')} "
                              f"{failed[0].get('Message', '')}".rstrip())
        location.fs.invalidate_cache(location.root)
        return
    for key in keys:
        with contextlib.suppress(FileNotFoundError):
            retry_io(location.uri(key), location.fs.rm_file, location.path(key))


def list_files(location: Location, key: str) -> list[str]:
    """Names of the files directly under `key`, sorted; none when `key` does not exist."""
    path = location.path(key)
    try:
        entries = list(_entries(location.fs, path))
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(entry["name"]) for entry in entries if entry.get("type") == "file")


def last_modified(location: Location, key: str) -> dt.datetime | None:
    """When the newest object under the folder `key` was last written (UTC); None when it
    holds no object (an empty or missing folder)."""
    path = location.path(key)
    location.fs.invalidate_cache(path)  # a cached listing would miss what was written since
    found = retry_io(location.uri(key), location.fs.find, path, detail=True)
    return max((_modified_at(location.fs, info) for info in found.values()), default=None)


def _modified_at(fs: AbstractFileSystem, info: dict[str, Any]) -> dt.datetime:
    """An fsspec info dict's modification time: `LastModified` on S3, `mtime` on local disks,
    else whatever the filesystem answers for the path."""
    value = info.get("LastModified", info.get("mtime"))
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    if not isinstance(value, dt.datetime):
        value = retry_io(info["name"], fs.modified, info["name"])
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def remove_folder(location: Location, key: str) -> None:
    """Delete the folder `key` and everything under it; nothing to do when it does not exist."""
    path = location.path(key)
    with contextlib.suppress(FileNotFoundError):
        retry_io(location.uri(key), location.fs.rm, path, recursive=True)
    location.fs.invalidate_cache(path)


def remove_empty_folder(location: Location, key: str) -> None:
    """Delete the folder `key` if nothing is in it: on a local disk, where folders outlive
    their files (an object store has none); one that holds anything stays."""
    if location.is_local:
        with contextlib.suppress(OSError):
            os.rmdir(location.path(key))


def remove_emptied_folders(location: Location, keys: Sequence[str]) -> None:
    """After the files `keys` were deleted, the folders that held them and their parents, up
    to the first level, that are left empty: on a local disk, where folders outlive their files
    (an empty partition folder stops `geopandas.read_parquet` of the table)."""
    if not location.is_local:
        return
    tried: set[str] = set()
    for key in keys:
        folder = posixpath.dirname(key)
        while folder and folder not in tried:
            tried.add(folder)
            remove_empty_folder(location, folder)
            folder = posixpath.dirname(folder)


def _replace_local_file(path: str, fill: Callable[[BinaryIO], object]) -> None:
    """`fill` a hidden temporary file beside `path`, flushed to disk, then rename it over
    `path`: a reader sees the old file or the new one. Nothing is left behind on failure."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read_bytes(location: Location, key: str) -> bytes | None:
    """The object's bytes, or None when it does not exist: one version whole, even while a
    writer replaces it."""
    # s3fs reads objects over its block size (50 MiB) in parallel ranged GETs, unpinned: an
    # object replaced meanwhile comes back as a mix of both versions. One GET is one version.
    options = {"max_concurrency": 1} if _is_s3(location.fs) else {}
    try:
        return retry_io(location.uri(key), location.fs.cat_file, location.path(key), **options)
    except FileNotFoundError:
        return None


# I/O errors that another attempt will meet again
_PERMANENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
# and the error numbers s3fs gives a request the store refuses for good (a 400's InvalidRequest,
# as for an object encrypted with a customer's key read without it, InvalidArgument,
# InvalidRange; 405; 501; a redirect to another region): those errors and an unknown code's
# EIO, a 500's EREMOTEIO and a 503's or SlowDown's EBUSY may pass
# (405's EPERM is a PermissionError already)
_PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.EMSGSIZE, errno.ENAMETOOLONG, errno.EREMCHG})
# S3's codes that s3fs gives EINVAL, though they tell of a connection cut or corrupted in
# flight, or of credentials to refresh: another attempt may pass
_S3_CODES_THAT_MAY_PASS = frozenset({"IncompleteBody", "BadDigest", "TokenRefreshRequired"})
# botocore's network errors (endpoint unreachable, connection reset or closed) are not
# OSErrors, and s3fs passes them on as they are; named, so botocore stays optional
_BOTOCORE_NETWORK_ERRORS = frozenset({"ConnectionError", "HTTPClientError"})


def is_transient(error: BaseException | None) -> bool:
    """An I/O error that may pass (connection errors, timeouts, a storage service's 5xx, which
    s3fs raises as OSError), itself or as the cause of one of our errors; not a missing,
    forbidden or misplaced path, nor a request the store refuses for good."""
    for link in error_chain(error, implicit=False):
        if isinstance(link, _PERMANENT) or (isinstance(link, OSError) and link.errno in _PERMANENT_ERRNOS
                                            and _s3_code(link) not in _S3_CODES_THAT_MAY_PASS):
            return False
        if isinstance(link, OSError | TimeoutError) or _is_botocore(link, _BOTOCORE_NETWORK_ERRORS):
            return True
    return False


def _s3_code(error: BaseException) -> str | None:
    """S3's error code behind an error s3fs translated (its cause, botocore's ClientError)."""
    response = getattr(error.__cause__, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _is_botocore(error: BaseException, names: frozenset[str]) -> bool:
    """Whether `error` is one of botocore's exceptions of these names (or a subclass of one),
    without importing botocore, which stays optional."""
    return any(cls.__module__ == "botocore.exceptions" and cls.__name__ in names for cls in type(error).__mro__)


# set within `unreachable_fails_fast`
_UNREACHABLE_FAILS_FAST: contextvars.ContextVar[bool] = contextvars.ContextVar("unreachable_fails_fast", default=False)
# what a store that refuses the connection, or whose host has no address, raises
_UNREACHABLE = (ConnectionRefusedError, socket.gaierror)
_BOTOCORE_UNREACHABLE = frozenset({"EndpointConnectionError"})


def _unreachable(error: BaseException | None) -> bool:
    return any(isinstance(link, _UNREACHABLE) or _is_botocore(link, _BOTOCORE_UNREACHABLE) for link in error_chain(error))


@contextlib.contextmanager
def unreachable_fails_fast() -> Iterator[None]:
    """Within it, a store that cannot be connected to at all fails its request at the first
    attempt (StorageUnavailableError), without `retry_io`'s backoff. For the command line's
    checks before a run: there, a refused connection or an unknown host is far likelier a mistyped endpoint
    than an outage, and is said in seconds rather than after the retries' half a minute a
    request (the S3 client's own retries within one attempt took 3 to 8 s here). Timeouts and
    a store's 5xx are retried as everywhere."""
    token = _UNREACHABLE_FAILS_FAST.set(True)
    try:
        yield
    finally:
        _UNREACHABLE_FAILS_FAST.reset(token)


def retry_io(what: str, call, *args, attempts: int = 5, first_delay: float = 0.5, **kwargs):
    """`call(*args, **kwargs)`, retried with exponential backoff (0.5, 1, 2, 4 s) on transient
    I/O errors; StorageUnavailableError once they are used up (or at once for an unreachable
    store within `unreachable_fails_fast`). `what` names the object for the message (never
    the credentials)."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if not is_transient(err):
                raise
            if _UNREACHABLE_FAILS_FAST.get() and _unreachable(err):
                raise StorageUnavailableError(f"{what}: cannot connect ({type(err).__name__}: {err})") from err
            if attempt == attempts:
                raise StorageUnavailableError(
                    f"{what}: still failing after {attempts} attempts ({type(err).__name__}: {err})"
                ) from err
            log.warning("%s: %s; attempt %d of %d in %.1f s", what, type(err).__name__, attempt + 1, attempts, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
