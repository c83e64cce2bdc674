"""A study folder on a local path or on an object store (``s3://``, ``gs://``), through ``pyarrow.fs``.

:class:`StudyFolder` is the one place that knows where a study folder lives:

- ``location``: what the user gave (``--storage`` joined with the study name): an absolute local path,
  or a URI such as ``s3://bucket/studies/smoke`` (a query string, e.g.
  ``s3://bucket/studies/smoke?endpoint_override=http://minio:9000``, is kept and passed to pyarrow);
- ``local``: the driver-local folder the runner writes with plain file operations. For a local study it
  is the folder itself; for a URI it is a mirror in the cache
  (``$BRAINAGE_CACHE/studies/<sha1 of the URI>/<name>``, cache as in ``brainage_core.data.sources``)
  whose small files are uploaded after every write (:meth:`upload`: one PUT, atomic on S3 and GCS) and
  downloaded before they are read (:meth:`download`, :meth:`materialize`);
- ``child(rel)``: the location of something inside the folder (what Tune's / Train's ``storage_path``
  get: a URI for a remote folder, which Ray reads and writes through the same pyarrow file systems).

Credentials and endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``; ``GOOGLE_APPLICATION_CREDENTIALS``
for GCS) or the URI's query string. :meth:`check_writable` writes, reads back and deletes a marker and
turns any failure (no bucket, bad credentials, unreachable endpoint) into ONE ``ConfigError`` naming
the URI. For a local folder every transfer method is a no-op.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from brainage_core.errors import ConfigError, DataError

__all__ = ["StudyFolder", "URI_SCHEMES", "is_uri", "join_location", "fetch_tree", "location_exists",
           "MATERIALIZED_FILES", "MATERIALIZED_TREES"]

URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "hdfs://")
#: the small files a reader of a study needs (analysis, final.py, export); big trees stay remote
MATERIALIZED_FILES = ("config.yaml", "space.yaml", "results.parquet", "results.journal.jsonl", "optuna.db",
                      "pareto.csv", "pareto.parquet", "final.parquet", "final_summary.csv")
MATERIALIZED_TREES = ("trials",)
_PYARROW_SCHEMES = {"s3": "s3", "gcs": "gs", "gs": "gs", "abfs": "abfs", "hdfs": "hdfs"}


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``, ...), False for a local path."""
    return str(location).startswith(URI_SCHEMES)


def join_location(location: str, rel: str) -> str:
    """``location`` / ``rel`` for a local path or a URI (a URI's query string stays at the end)."""
    rel = str(rel).strip("/")
    if not is_uri(location):
        return str(Path(location) / rel) if rel else str(location)
    base, _, query = str(location).partition("?")
    joined = f"{base.rstrip('/')}/{rel}" if rel else base
    return f"{joined}?{query}" if query else joined


def _filesystem(location: str) -> tuple[Any, str]:
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) for a bad URI
        raise ConfigError(f"storage {location}: pyarrow cannot open it ({exc}): expected s3://bucket/prefix or "
                          f"gs://bucket/prefix") from None


def read_location_text(location: str) -> str:
    """The text of a file at a local path or URI."""
    if is_uri(location):
        fs, p = _filesystem(location)
        with fs.open_input_stream(p) as f:
            return f.read().decode()
    return Path(location).read_text()


def write_location_bytes(location: str, data: bytes) -> None:
    """Write ``data`` to a file at a local path (its folder created) or URI."""
    if is_uri(location):
        fs, p = _filesystem(location)
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    Path(location).write_bytes(data)


def write_location_text(location: str, text: str) -> None:
    """Write ``text`` (UTF-8) to a file at a local path (its folder created) or URI."""
    write_location_bytes(location, text.encode())


def delete_location(location: str) -> None:
    """Delete the file at a local path or URI; a missing file or a store error is ignored (best effort)."""
    try:
        if is_uri(location):
            fs, p = _filesystem(location)
            fs.delete_file(p)
        else:
            Path(location).unlink(missing_ok=True)
    except (OSError, ConfigError):
        pass


def location_exists(location: str | os.PathLike[str]) -> bool:
    """Whether a file or folder exists at a local path or URI (False when the store cannot be read)."""
    import pyarrow.fs

    if not is_uri(location):
        return Path(location).exists()
    fs, path = _filesystem(str(location))
    try:
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    except OSError:
        return False


def fetch_tree(location: str, dest: str | os.PathLike[str], *,
               what: str = "a folder written by study/run.py or study/export.py") -> Path:
    """Copy the folder at a URI into the local folder ``dest`` (replaced); returns ``dest``.

    DataError naming the URI (and ``what`` was expected there) when there is no folder there."""
    import pyarrow.fs

    fs, path = _filesystem(location)
    dest = Path(dest)
    try:
        info = fs.get_file_info(path)
        if info.type != pyarrow.fs.FileType.Directory:
            raise DataError(f"{location}: no such folder on the object store: expected {what}")
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pyarrow.fs.copy_files(path, str(tmp), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
    except OSError as exc:
        raise DataError(f"{location}: cannot download it ({exc})") from None
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


class StudyFolder:
    """A study folder (see the module docstring). Picklable: the pyarrow file system is rebuilt lazily.

    Long for a reason: one small method per file operation, each the same for a local folder and an
    object store; splitting them by backend would put the local/remote choice in every caller.
    """

    def __init__(self, location: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None):
        text = str(location)
        self.is_remote = is_uri(text)
        if self.is_remote:
            self.location = text.rstrip("/") if "?" not in text else text
            base = urlsplit(self.location)
            name = PurePosixPath(base.path).name or base.netloc
            if not base.netloc:
                raise ConfigError(f"storage {text}: no bucket in the URI: expected s3://bucket/prefix or "
                                  f"gs://bucket/prefix")
            from brainage_core.data.sources import cache_dir_of

            digest = hashlib.sha1(self.location.encode()).hexdigest()[:16]
            self.local = cache_dir_of(cache_dir) / "studies" / digest / name
        else:
            self.location = str(Path(text).expanduser().resolve())
            self.local = Path(self.location)
        self._fs: tuple[Any, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def __repr__(self) -> str:
        return f"StudyFolder({self.location!r})"

    @property
    def name(self) -> str:
        return self.local.name

    @property
    def filesystem(self) -> Any:
        """The pyarrow file system of the folder."""
        return self._pyarrow()[0]

    @property
    def path(self) -> str:
        """The folder's path inside :attr:`filesystem` (for S3: ``bucket/prefix/name``, no scheme)."""
        return self._pyarrow()[1]

    def _pyarrow(self) -> tuple[Any, str]:
        if self._fs is None:
            if self.is_remote:
                self._fs = _filesystem(self.location)
            else:
                import pyarrow.fs

                self._fs = (pyarrow.fs.LocalFileSystem(), self.location)
        return self._fs

    def _remote(self, rel: str) -> str:
        return f"{self.path.rstrip('/')}/{str(rel).strip('/')}" if str(rel).strip("/") else self.path

    def child(self, rel: str = "") -> str:
        """The location (local path or URI) of ``rel`` inside the folder."""
        return join_location(self.location, rel)

    def uri_of(self, fs_path: str) -> str:
        """A URI for a path of this folder's file system (e.g. a Ray checkpoint's ``path``): the scheme is
        added for a remote folder, and the folder's query string (e.g. ``endpoint_override``) kept; a local
        path is returned as is."""
        if not self.is_remote or is_uri(fs_path):
            return fs_path
        scheme = _PYARROW_SCHEMES.get(self.filesystem.type_name, self.filesystem.type_name)
        query = self.location.partition("?")[2]
        return f"{scheme}://{fs_path.lstrip('/')}" + (f"?{query}" if query else "")

    # ---- transfers ------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists in the folder (remote: on the object store)."""
        if not self.is_remote:
            return (self.local / rel).exists()
        import pyarrow.fs

        try:
            return self.filesystem.get_file_info(self._remote(rel)).type != pyarrow.fs.FileType.NotFound
        except OSError as exc:
            raise ConfigError(f"storage {self.location}: cannot read {rel} ({exc})") from None

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of ``rel`` (remote: read from the object store, not the mirror)."""
        if not self.is_remote:
            return (self.local / rel).read_bytes()
        with self.filesystem.open_input_stream(self._remote(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def upload(self, rel: str, source: str | os.PathLike[str] | None = None) -> None:
        """Put the local file ``source`` (default: the mirror's ``rel``) at ``rel`` in the folder; a no-op for
        a local folder when ``source`` is the file itself. One PUT: readers see the old or the new object."""
        src = Path(source) if source is not None else self.local / rel
        if not self.is_remote:
            dst = self.local / rel
            if src.resolve() != dst.resolve():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            return
        data = src.read_bytes()
        with self.filesystem.open_output_stream(self._remote(rel)) as f:
            f.write(data)

    def download(self, rel: str, dest: str | os.PathLike[str] | None = None) -> Path | None:
        """Copy ``rel`` from the object store to ``dest`` (default: the mirror); None when it does not exist.
        A local folder returns its own file (or None)."""
        if not self.is_remote:
            path = self.local / rel
            return path if path.exists() else None
        if not self.exists(rel):
            return None
        target = Path(dest) if dest is not None else self.local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(self.read_bytes(rel))
        os.replace(tmp, target)
        return target

    def download_tree(self, rel: str, dest: str | os.PathLike[str] | None = None) -> Path | None:
        """Copy the folder ``rel`` to ``dest`` (default: the mirror); None when it does not exist."""
        if not self.is_remote:
            path = self.local / rel
            return path if path.exists() else None
        if not self.exists(rel):
            return None
        return fetch_tree(self.child(rel), Path(dest) if dest is not None else self.local / rel)

    def materialize(self) -> Path:
        """The folder as a local path for readers: a local folder as is; a remote one's small files
        (:data:`MATERIALIZED_FILES`, :data:`MATERIALIZED_TREES`) downloaded into the mirror first (files
        missing remotely are removed from the mirror). DataError when the folder holds no study."""
        if not self.is_remote:
            return self.local
        try:
            found = [self.download(rel) for rel in MATERIALIZED_FILES]
        except OSError as exc:
            raise DataError(f"study folder {self.location}: cannot read it ({exc})") from None
        if not any(found):
            raise DataError(f"study folder {self.location} holds none of {', '.join(MATERIALIZED_FILES[:3])}: "
                            f"expected a folder written by study/run.py")
        for rel, got in zip(MATERIALIZED_FILES, found):
            if got is None:
                (self.local / rel).unlink(missing_ok=True)
        for rel in MATERIALIZED_TREES:
            self.download_tree(rel)
        return self.local

    def clear_mirror(self) -> None:
        """Remove the driver-local mirror of a remote folder (a new study must not read a stale one)."""
        if self.is_remote:
            shutil.rmtree(self.local, ignore_errors=True)

    def check_writable(self) -> None:
        """Write, read back and delete a marker in the folder: ONE ConfigError naming the location and the
        storage's error when that fails (no bucket, bad credentials, unreachable endpoint)."""
        rel = f".write-probe-{uuid.uuid4().hex[:12]}"
        token = uuid.uuid4().hex.encode()
        if not self.is_remote:
            try:
                self.local.mkdir(parents=True, exist_ok=True)
                (self.local / rel).write_bytes(token)
                ok = (self.local / rel).read_bytes() == token
                (self.local / rel).unlink()
            except OSError as exc:
                raise ConfigError(f"--storage {self.location}: cannot write there ({exc}): expected a writable "
                                  f"folder") from None
        else:
            try:
                fs, target = self.filesystem, self._remote(rel)
                with fs.open_output_stream(target) as f:
                    f.write(token)
                with fs.open_input_stream(target) as f:
                    ok = f.read() == token
                fs.delete_file(target)
            except (OSError, ValueError) as exc:
                detail = " ".join(str(exc).split())
                raise ConfigError(f"--storage {self.location}: cannot write a marker object there ({detail}): "
                                  f"expected an existing bucket reachable with the credentials of the "
                                  f"environment (AWS_* / GOOGLE_* variables, AWS_ENDPOINT_URL for an S3-compatible "
                                  f"store); see docs/cluster.md") from None
        if not ok:
            raise ConfigError(f"--storage {self.location}: a marker written there read back different: expected "
                              f"consistent storage")
