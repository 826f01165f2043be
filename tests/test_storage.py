"""Discovery and shards, on a local folder and on a real S3 API (moto's server over HTTP)."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import s3fs

from pipeline.run import list_source, plan_shard
from pipeline.storage import (
    STEM_CHUNK_LIMIT,
    ListingCounts,
    StorageUnavailableError,
    files_named_like,
    is_image_key,
    iter_files,
    iter_shards,
    open_file,
    open_location,
    put_file_atomic,
    read_bytes,
    remove_files,
    write_atomic,
)

KEYS = [
    "2026-11-19/cam1/a.jpg", "2026-11-19/cam1/b.JPEG", "2026-11-19/cam1/c.png", "2026-11-19/cam1/notes.txt",
    "2026-11-19/cam2/d.TIF", "2026-11-19/cam2/e.tiff", "2026-11-19/top.webp",
    "2026-11-20/cam1/f.jpg", "2026-11-20/cam1/g.Png", "2026-11-20/readme", "root.jpg",
]


def _fill_local(tmp_path):
    for key in KEYS:
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.encode())
    return open_location(str(tmp_path))


def _fill_s3(bucket, options):
    fs = s3fs.S3FileSystem(**options)
    for key in KEYS:
        fs.pipe_file(f"{bucket[5:]}/archive/{key}", key.encode())
    return open_location(f"{bucket}/archive/", options)


def test_s3_keys_with_an_empty_segment_are_listed(s3_bucket):
    """S3 allows a//b.jpg and /a.jpg: listed (and the listing ends), such a key becomes an
    unsafe_key row (`mask_key` refuses it), rather than vanishing from the run without a row."""
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    keys = ["n6//double.jpg", "n6/d//c.jpg", "n6/ok.jpg", "n6///triple.jpg", "/lead.jpg", "//two.jpg"]
    for key in keys:
        fs.pipe_file(f"{bucket[5:]}/{key}", b"x")
    files = [f for _, f in itertools.islice(iter_files(open_location(bucket, options)), 100)]  # a loop fails, not hangs
    assert sorted(f.key for f in files) == sorted(keys)
    todo, refused = plan_shard(files)
    assert [f.key for f in todo] == ["n6/ok.jpg"]
    assert sorted((r.key, r.error_type) for r in refused) == sorted((k, "unsafe_key") for k in keys if k != "n6/ok.jpg")


@pytest.mark.parametrize("root", ["", "archive"])
def test_files_named_like_and_remove_files_on_s3(s3_bucket, root):
    """The keys of a folder that begin so, asked of S3 by prefix, from a bucket or a folder in
    it; and files removed in bulk, missing ones among them."""
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    base = f"{bucket[5:]}/{root}/" if root else f"{bucket[5:]}/"
    for key in ["d/a.jpg", "d/a.k.jpg", "d/a.png", "d/ab.jpg", "d/a/inner.jpg", "a.jpg"]:
        fs.pipe_file(base + key, b"x")
    location = open_location(f"{bucket}/{root}" if root else bucket, options)
    assert files_named_like(location, "d/a.") == ["d/a.jpg", "d/a.k.jpg", "d/a.png"]
    assert files_named_like(location, "d/") == ["d/a.jpg", "d/a.k.jpg", "d/a.png", "d/ab.jpg"]
    assert files_named_like(location, "a.") == ["a.jpg"]
    remove_files(location, ["d/a.jpg", "d/missing.png", "a.jpg"])
    fs.invalidate_cache()
    assert sorted(fs.find(base.rstrip("/"))) == sorted(base + k for k in ["d/a.k.jpg", "d/a.png", "d/ab.jpg", "d/a/inner.jpg"])


def test_image_keys_by_extension_in_any_case():
    assert all(is_image_key(k) for k in ["a.jpg", "b.JPEG", "c.Png", "d.tif", "e.TIFF", "f.webp"])
    assert not any(is_image_key(k) for k in ["a.txt", "readme", "x.jpg.bak", "png"])


def test_listing_order_and_versions_agree_between_local_and_s3(tmp_path, s3_bucket):
    local = [(d, f.key, f.size) for d, f in iter_files(_fill_local(tmp_path))]
    remote = list(iter_files(_fill_s3(*s3_bucket)))
    assert [(d, f.key, f.size) for d, f in remote] == local
    assert {f.key for _, f in remote} == set(KEYS)
    # files of a directory first, in name order, then its sub-directories
    assert [f.key for _, f in remote][:3] == ["root.jpg", "2026-11-19/top.webp", "2026-11-19/cam1/a.jpg"]
    assert all(len(f.version) == 32 for _, f in remote)  # S3 ETags (MD5 of single-part uploads)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_directory_shards_are_deterministic_and_skip_non_images(where, tmp_path, s3_bucket):
    location = _fill_local(tmp_path) if where == "local" else _fill_s3(*s3_bucket)
    counts = ListingCounts()
    shards = list(iter_shards(location, shard_by="directory", shard_size=2, counts=counts))
    assert [[f.key for f in s.files] for s in shards] == [
        ["root.jpg"], ["2026-11-19/top.webp"],
        ["2026-11-19/cam1/a.jpg", "2026-11-19/cam1/b.JPEG"], ["2026-11-19/cam1/c.png"],
        ["2026-11-19/cam2/d.TIF", "2026-11-19/cam2/e.tiff"], ["2026-11-20/cam1/f.jpg", "2026-11-20/cam1/g.Png"],
    ]
    assert (counts.images, counts.skipped) == (9, 2)
    assert counts.skipped_by_extension == {".txt": 1, "(none)": 1}
    again = list(iter_shards(location, shard_by="directory", shard_size=2))
    assert [s.shard_id for s in again] == [s.shard_id for s in shards]
    assert len({s.shard_id for s in shards}) == len(shards)


def test_a_local_folder_removed_while_it_is_listed_holds_nothing(tmp_path):
    """A retention job removing a night's folder after its parent was listed: the folders
    after it are still listed, as an emptied prefix on S3 is; the run went down with it."""
    import shutil

    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes(b"x")
    listing = iter_files(open_location(str(tmp_path)))
    assert next(listing)[1].key == "a/x.jpg"
    shutil.rmtree(tmp_path / "b")
    assert [file.key for _, file in listing] == ["c/x.jpg"]


def test_symbolic_links_to_folders_are_followed_once(tmp_path):
    """A folder linked into SOURCE is listed as a folder, under the link's name; a link to a
    folder SOURCE lists anyway (`latest` -> a night's) is not listed twice, and a link back
    up a followed folder ends. They were skipped as files without an image extension."""
    source, elsewhere = tmp_path / "source", tmp_path / "elsewhere"
    for folder in (source / "2026-11-24", elsewhere / "night"):
        folder.mkdir(parents=True)
        (folder / "x.jpg").write_bytes(b"x")
    (source / "2026-11-25").symlink_to(elsewhere / "night")
    (source / "latest").symlink_to(source / "2026-11-24")
    (elsewhere / "night" / "again").symlink_to(elsewhere / "night")
    (source / "frame.jpg").symlink_to(elsewhere / "night" / "x.jpg")  # a link to a file is a file
    (source / "up").symlink_to(tmp_path)  # SOURCE's parent, which holds it and its OUTPUT: never listed
    (elsewhere / "night" / "home").symlink_to(elsewhere)  # up from a followed folder
    keys = [file.key for _, file in iter_files(open_location(str(source)))]
    assert keys == ["frame.jpg", "2026-11-24/x.jpg", "2026-11-25/x.jpg"]
    # nor into OUTPUT, or a folder that holds it, which preflight's check of folders cannot see
    # through a link: a run would segment the masks the last one wrote
    output = tmp_path / "results" / "out"
    (output / "masks").mkdir(parents=True)
    (output / "masks" / "x.png").write_bytes(b"x")
    (source / "masks").symlink_to(output / "masks")
    (source / "results").symlink_to(tmp_path / "results")
    assert "masks/x.png" in [file.key for _, file in iter_files(open_location(str(source)))]  # unasked
    listed = list_source(open_location(str(source)), f"file://{output}", shard_by="count", shard_size=10,
                         counts=ListingCounts())
    assert [file.key for shard in listed.remaining() for file in shard.files] == keys


def test_count_shards_cross_directories(tmp_path):
    shards = list(iter_shards(_fill_local(tmp_path), shard_by="count", shard_size=4))
    assert [len(s.files) for s in shards] == [4, 4, 1]
    assert shards[0].files[1].key == "2026-11-19/top.webp"


@pytest.mark.parametrize("shard_by", ["directory", "count"])
def test_a_chunk_is_not_cut_between_the_keys_of_one_stem(shard_by, tmp_path):
    """a.jpg, a.png and a.tif may share a mask path, so they are planned in one shard, with
    what lies between them in name order (a.k.jpg); a chunk is cut elsewhere at its size
    (frame.0.jpg and frame.1.jpg are two stems). Past STEM_CHUNK_LIMIT times the size, a
    chunk is cut anyway, so shards stay bounded."""
    names = ["a.b.jpg", "a.jpg", "a.k.jpg", "a.m.jpg", "a.png", "a.tif", "b.jpg", "c.jpg"] + [
        f"frame.{i}.jpg" for i in range(4)] + ["x.2.jpg", "x.3.jpg", "x.3.png", "x.4.jpg"]
    for name in names:
        (tmp_path / "cam" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "cam" / name).write_bytes(b"x")
    shards = [[f.key.removeprefix("cam/") for f in s.files]
              for s in iter_shards(open_location(str(tmp_path)), shard_by=shard_by, shard_size=2)]
    assert shards == [["a.b.jpg", "a.jpg", "a.k.jpg", "a.m.jpg", "a.png", "a.tif"], ["b.jpg", "c.jpg"],
                      ["frame.0.jpg", "frame.1.jpg"], ["frame.2.jpg", "frame.3.jpg"],
                      ["x.2.jpg", "x.3.jpg", "x.3.png"], ["x.4.jpg"]]
    limit = tmp_path / "limit"
    limit.mkdir()
    for name in ["z.jpg", *(f"z.k{i:02d}.jpg" for i in range(STEM_CHUNK_LIMIT + 2)), "z.png"]:  # in name order
        (limit / name).write_bytes(b"x")
    sizes = [len(s.files) for s in iter_shards(open_location(str(limit)), shard_by=shard_by, shard_size=1)]
    assert sizes == [STEM_CHUNK_LIMIT, 1, 1, 1, 1]  # z.jpg's stem is open until z.png: cut at the limit


def test_manifest_digest_changes_when_a_file_changes(tmp_path):
    location = _fill_local(tmp_path)
    before = {s.shard_id: s.manifest_digest() for s in iter_shards(location)}
    (tmp_path / "2026-11-19/cam2/d.TIF").write_bytes(b"rewritten with other bytes")
    after = {s.shard_id: s.manifest_digest() for s in iter_shards(location)}
    assert before.keys() == after.keys()
    assert [k for k in before if before[k] != after[k]] == [next(iter(
        s.shard_id for s in iter_shards(location) if s.files[0].key == "2026-11-19/cam2/d.TIF"))]


def test_listing_is_streamed(s3_bucket):
    """The first shard arrives after one S3 page, not after the whole listing."""
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.pipe({f"{bucket[5:]}/flat/{i:05d}.jpg": b"x" for i in range(2500)})
    calls = []
    original = fs._call_s3

    async def counting(method, *args, **kwargs):
        calls.append(method)
        return await original(method, *args, **kwargs)

    location = open_location(f"{bucket}/flat", options)
    location.fs._call_s3 = counting
    shards = iter_shards(location, shard_by="count", shard_size=100)
    first = next(shards)
    assert first.files[0].key == "00000.jpg"
    assert calls.count("list_objects_v2") == 1  # one page of 1000 keys, of 3
    rest = list(itertools.chain([first], shards))
    assert sum(len(s.files) for s in rest) == 2500
    assert calls.count("list_objects_v2") == 3


def test_aws_endpoint_url_from_the_environment(s3_bucket, s3_endpoint, monkeypatch):
    bucket, options = s3_bucket
    s3fs.S3FileSystem(**options).pipe_file(f"{bucket[5:]}/x/a.jpg", b"abc")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    location = open_location(f"{bucket}/x")  # no storage options: botocore reads the variable
    assert [f.key for _, f in iter_files(location)] == ["a.jpg"]


def test_storage_options_are_not_passed_to_local_paths(tmp_path):
    location = open_location(str(tmp_path), {"endpoint_url": "http://127.0.0.1:1", "key": "k"})
    assert location.is_local and location.url == str(tmp_path)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_atomic_replaces_whole_objects(where, tmp_path, s3_bucket):
    location = open_location(str(tmp_path / "out")) if where == "local" else open_location(f"{s3_bucket[0]}/out", s3_bucket[1])
    write_atomic(location, "t/x.parquet", b"first")
    write_atomic(location, "t/x.parquet", b"second")
    assert read_bytes(location, "t/x.parquet") == b"second"
    assert read_bytes(location, "t/missing") is None
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "out" / "t").iterdir()) == ["x.parquet"]  # no temporaries left


def test_a_file_url_opens_as_its_folder_and_key(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    location, key = open_file(f"{bucket}/models/best.pt", options)
    assert (location.url, key, location.uri(key)) == (f"{bucket}/models", "best.pt", f"{bucket}/models/best.pt")
    write_atomic(location, key, b"weights")
    assert read_bytes(*open_file(f"{bucket}/models/best.pt", options)) == b"weights"
    location, key = open_file(str(tmp_path / "best.pt"))
    assert location.is_local and location.path(key) == str(tmp_path / "best.pt")
    with pytest.raises(ValueError, match="names no file"):
        open_file(bucket, options)


def test_an_error_chain_follows_causes_and_what_was_being_handled_each_once():
    from pipeline.errors import error_chain

    def raised(make):
        try:
            make()
        except BaseException as err:
            return err
        raise AssertionError("nothing raised")

    def during_handling():
        try:
            raise ConnectionRefusedError("refused")
        except OSError:
            raise ValueError("wrapped without from")  # noqa: B904 - the implicit chain under test

    def explicit():
        try:
            raise ConnectionRefusedError("refused")
        except OSError as err:
            raise RuntimeError("wrapped") from err

    def cut():
        try:
            raise ConnectionRefusedError("refused")
        except OSError:
            raise RuntimeError("replaced") from None

    implicit = raised(during_handling)
    assert [type(e) for e in error_chain(implicit)] == [ValueError, ConnectionRefusedError]
    assert [type(e) for e in error_chain(implicit, implicit=False)] == [ValueError]
    assert [type(e) for e in error_chain(raised(explicit), implicit=False)] == [RuntimeError, ConnectionRefusedError]
    assert [type(e) for e in error_chain(raised(cut))] == [RuntimeError]
    looped = ValueError("a")
    looped.__cause__ = KeyError("b")
    looped.__cause__.__cause__ = looped  # a chain that comes back to its start ends there
    assert [type(e) for e in error_chain(looped)] == [ValueError, KeyError]
    assert list(error_chain(None)) == []


def test_an_unreachable_endpoint_is_retried_then_reported(monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    delays: list[float] = []
    monkeypatch.setattr("pipeline.storage.time", SimpleNamespace(sleep=delays.append))  # storage's clock only
    # botocore raises EndpointConnectionError, which is no OSError; one attempt in botocore
    location = open_location("s3://bucket/prefix", {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s",
                                                    "config_kwargs": {"retries": {"total_max_attempts": 1}}})
    with pytest.raises(StorageUnavailableError, match=r"still failing after 5 attempts .*EndpointConnectionError"):
        read_bytes(location, "a.jpg")
    assert delays == [0.5, 1, 2, 4]


def test_put_file_atomic_local_and_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "mask.tif"
    source.write_bytes(b"new mask")
    local = open_location(str(tmp_path / "out"))
    (tmp_path / "out" / "masks" / "a").mkdir(parents=True)
    (tmp_path / "out" / "masks" / "a" / "b.tif").write_bytes(b"old mask")
    put_file_atomic(local, "masks/a/b.tif", source)
    assert (tmp_path / "out" / "masks" / "a" / "b.tif").read_bytes() == b"new mask"
    assert [p.name for p in (tmp_path / "out" / "masks" / "a").iterdir()] == ["b.tif"]  # no temporary left

    remote = open_location(f"memory://geo-test-{tmp_path.name}")
    calls = []
    put_file = remote.fs.put_file

    def flaky(*args, **kwargs):  # one dropped connection, then the upload goes through
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionResetError("reset by peer")
        return put_file(*args, **kwargs)

    monkeypatch.setattr(remote.fs, "put_file", flaky)
    put_file_atomic(remote, "masks/a/b.tif", source)
    assert len(calls) == 2 and remote.fs.cat_file(remote.path("masks/a/b.tif")) == b"new mask"


FULL_DISK_BEHIND_ANOTHER_FILESYSTEM = """
import resource, sys
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from pipeline.storage import Location, StorageUnavailableError, move_atomic, put_file_atomic, write_atomic

# a filesystem that is neither a local disk nor an object store, as sftp is to segpipe:
# writes go through fsspec's open-and-fill, renames through its mv
location = Location(DirFileSystem(path=sys.argv[1], fs=LocalFileSystem()), "out", "dir://out")
write_atomic(location, "images/part-0.parquet", b"old rows" * 100)
write_atomic(location, "staged.parquet", b"staged rows")
move_atomic(location, "staged.parquet", "class_stats/part-0.parquet")
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # the disk fills: no file grows past 2 KiB
for write in (lambda: write_atomic(location, "images/part-0.parquet", b"new rows" * 1000),
              lambda: put_file_atomic(location, "images/part-0.parquet", sys.argv[2])):
    try:
        write()
    except StorageUnavailableError as err:  # EFBIG, retried as a full disk may be emptied
        print(type(err).__name__)
"""


def test_writes_are_whole_on_a_filesystem_that_is_no_object_store(tmp_path: Path) -> None:
    """On a filesystem that is neither local nor an object store, whose rename replaces a
    file (sftp; here fsspec's DirFileSystem over a disk), a write filled the file at its path:
    a full disk (or a crash) left a truncated table there, which a reader took as whole. It
    goes through a hidden temporary file renamed over the target, as on a local disk."""
    import subprocess
    import sys

    big = tmp_path / "big.parquet"  # over the limit: its copy is what fails
    big.write_bytes(b"new rows" * 1000)
    done = subprocess.run([sys.executable, "-c", FULL_DISK_BEHIND_ANOTHER_FILESYSTEM, str(tmp_path), str(big)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["StorageUnavailableError"] * 2
    out = tmp_path / "out"
    assert (out / "images" / "part-0.parquet").read_bytes() == b"old rows" * 100
    assert (out / "class_stats" / "part-0.parquet").read_bytes() == b"staged rows" and not (out / "staged.parquet").exists()
    assert sorted(p.name for p in (out / "images").iterdir()) == ["part-0.parquet"]  # no temporary left


# --- polygons ---------------------------------------------------------------------------
