"""Opening the files users give us without hanging, crashing or allocating without bound.

Every command that opens a dataset, a checkpoint, an image, a config or a source file goes
through here first, so each kind of bad file gets one message (exit 2 through `UsageError`):

* `check_file` refuses what is not a regular readable file, with the right words: missing, a
  directory, a named pipe (FIFO), a device or a socket (reading those could block forever),
  unreadable (permission);
* `open_h5` opens an HDF5 file read-only and scans its links and datasets once: external links,
  external raw storage and virtual datasets (data that lives in *another* file, which could be
  a FIFO or a file that is not there on every host) are refused deliberately, so is a file with
  an absurd number of objects; errors of the HDF5 library (truncated, not HDF5, locked by a
  writer, damaged) become one line naming the file;
* `read_dataset` / `read_attr` read one dataset or attribute after checking what reading it
  implies: a null dataspace, a compression filter this h5py cannot decode, chunks that were
  never written (they would read as zeros), and the bytes the read allocates against
  `memory_limit()`; damage found while reading (a corrupted chunk) is one line too;
* `require_bytes` is the size check every allocation a request implies goes through first,
  naming the number of bytes and the limit; `check_model_memory` applies it to a model spec
  (parameters and their gradient, momentum and checkpoint copies, the per-rank input batch)
  before any of it is allocated;
* `read_limited` reads a whole file (gunzipping it if it starts with the gzip magic) with a cap
  on the bytes it may produce, so a gzip bomb stops at the cap.

The memory limit is the machine's physical memory, or less: a cgroup memory limit, RLIMIT_AS /
RLIMIT_DATA, or the environment variable DISTCNN_MAX_BYTES (bytes, for a deliberate lower cap).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distcnn.errors import UsageError

MAX_OBJECTS = 10_000  # links an HDF5 file may hold; distcnn's own files have a few dozen
MAX_ATTR_BYTES = 16 << 20  # one HDF5 attribute (configs, mean/std): far above any real one
_PROBED: set[tuple[int, int, int, int]] = set()  # files whose metadata probe finished
PROBE_SECONDS = 10.0  # reading a file's metadata takes milliseconds; damaged, it may never end
_GZIP_MAGIC = b"\x1f\x8b"


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


def fmt_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant figures."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} EiB"  # pragma: no cover


def _cgroup_limit() -> int | None:
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(p).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def memory_limit() -> int:
    """Bytes one request may allocate: physical memory, lowered by a cgroup limit, RLIMIT_AS,
    RLIMIT_DATA and DISTCNN_MAX_BYTES where those are set."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):  # pragma: no cover - not Linux-like
        pass
    cg = _cgroup_limit()
    if cg:
        limits.append(cg)
    try:
        import resource

        for r in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            soft, _ = resource.getrlimit(r)
            if soft != resource.RLIM_INFINITY and soft > 0:
                limits.append(soft)
    except (ImportError, ValueError, OSError):  # pragma: no cover
        pass
    env = os.environ.get("DISTCNN_MAX_BYTES", "").strip()
    if env:
        try:
            value = int(float(env))
        except ValueError:
            raise UsageError(
                f"DISTCNN_MAX_BYTES={env!r} is not a number of bytes; e.g. DISTCNN_MAX_BYTES=8e9"
            ) from None
        if value < 1:
            raise UsageError(f"DISTCNN_MAX_BYTES={env!r} must be at least 1 byte")
        limits.append(value)
    return min(limits) if limits else 1 << 62


def require_bytes(nbytes: int, what: str, fix: str) -> None:
    """UsageError if `what` needs more than memory_limit() bytes: '<what> needs N (x bytes),
    more than the memory limit L of this machine: <fix>'."""
    limit = memory_limit()
    if nbytes > limit:
        raise UsageError(
            f"{what} needs {fmt_bytes(nbytes)} ({nbytes:,} bytes), more than the "
            f"{fmt_bytes(limit)} this machine allows one process (physical memory, cgroup/"
            f"ulimit or DISTCNN_MAX_BYTES): {fix}"
        )


def shape_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of an array of `shape`, in exact integer arithmetic (no int64 overflow)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def check_model_memory(
    spec: str, input_shape: tuple[int, ...], num_classes: int, batch_per_rank: int = 0
) -> int:
    """Refuse a model (and per-rank batch) whose memory would exceed the limit, before anything
    is allocated; returns the parameter count. Counts float32 parameters, gradients, momentum
    and a checkpoint copy (4x), the last layer's logits per image, and per image of the batch
    the float32 input plus the uint8 staging and index buffers of a batch gather (13 bytes a
    pixel). Spec errors come from the model's own parser."""
    from distcnn.model import build_layers  # builds shapes only: layers allocate lazily

    k = int(num_classes)
    per_image = math.prod(int(d) for d in input_shape)
    require_bytes(
        max(0, batch_per_rank) * (13 * per_image + 8 * (k + 2)),
        f"a per-rank batch of {batch_per_rank:,} images of {tuple(input_shape)}",
        "lower --batch-size (it is the GLOBAL batch, split across the ranks)",
    )
    layers = build_layers(spec, tuple(int(d) for d in input_shape), k)
    params = sum(math.prod(s) for layer in layers for s in layer.param_shapes().values())
    require_bytes(
        16 * params,
        f"the model {spec!r} with {params:,} parameters (weights, gradients, momentum and a "
        "checkpoint copy, float32)",
        "use narrower layers (smaller dense:N / conv:F) or more pooling",
    )
    return params


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_file(path: str | os.PathLike, what: str, fix: str = "give the path of the file") -> Path:
    """The path of a readable regular file, or UsageError: '<what> <path> is a directory, not a
    file: <fix>' (likewise missing, a FIFO, a device, a socket, unreadable)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UsageError(f"{what} {p} does not exist: {fix}") from None
    except NotADirectoryError:
        raise UsageError(
            f"{what} {p} does not exist (a parent is not a directory): {fix}"
        ) from None
    except PermissionError:
        raise UsageError(
            f"{what} {p} cannot be reached (permission denied on a directory above it): "
            "fix the permissions or copy the file somewhere readable"
        ) from None
    except OSError as e:
        raise UsageError(f"{what} {p} cannot be examined ({e.strerror or e}): {fix}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {p} is a directory, not a file: {fix}")
    for test, name in _KINDS:
        if test(st.st_mode):
            raise UsageError(
                f"{what} {p} is {name}, not a regular file (reading it could block forever): {fix}"
            )
    try:  # readable? O_NONBLOCK: a file swapped for a FIFO meanwhile cannot block the open
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except PermissionError:
        raise UsageError(
            f"{what} {p} is not readable (permission denied): chmod u+r it, or run as a user "
            "who may read it"
        ) from None
    except OSError as e:
        raise UsageError(f"{what} {p} cannot be opened ({e.strerror or e}): {fix}") from None
    os.close(fd)
    return p


def read_limited(
    path: str | os.PathLike, what: str, limit: int | None = None, fix: str = "check the path"
) -> bytes:
    """The bytes of a regular file, gunzipped when it starts with the gzip magic; refuses (before
    going past it) output larger than `limit` (default memory_limit()) — a gzip bomb stops
    there, naming the bytes it would need."""
    p = check_file(path, what, fix)
    cap = memory_limit() if limit is None else int(limit)
    size = p.stat().st_size
    if size > cap:
        require_bytes(size, f"{what} {p}", "give a smaller file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UsageError(f"{what} {p} cannot be read ({e.strerror or e}): {fix}") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    out = bytearray()
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = raw
    try:
        while data:
            out += d.decompress(data, max(1, cap + 1 - len(out)))
            if len(out) > cap:
                raise UsageError(
                    f"{what} {p} unpacks (gzip) to more than {fmt_bytes(cap)} ({cap:,} bytes), "
                    f"from {fmt_bytes(size)} on disk: it is a decompression bomb or far too big "
                    "for this machine; give the data uncompressed or in smaller files"
                )
            data = d.unconsumed_tail
            if d.eof:
                if d.unused_data[:2] == _GZIP_MAGIC:  # several gzip members, as gzip allows
                    data = d.unused_data
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    break
        if not d.eof:
            raise zlib.error("the gzip stream ends early (truncated)")
    except zlib.error as e:
        raise UsageError(f"{what} {p} is not a valid gzip file ({e}): re-download it") from None
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# HDF5
# ---------------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__).strip()


def describe_h5_error(e: BaseException, path: Path, what: str, fix: str) -> str:
    """One line for an error the HDF5 library (or the OS under it) raised on `path`."""
    msg = str(e)
    low = msg.lower()
    if "unable to lock file" in low or getattr(e, "errno", None) in (
        errno.EAGAIN,
        errno.EWOULDBLOCK,
    ):
        return (
            f"{what} {path} is locked by another process that has it open for writing (HDF5 "
            "file lock): wait until that process is done; if no process writes it (a file "
            "system without working locks), set HDF5_USE_FILE_LOCKING=FALSE"
        )
    if isinstance(e, PermissionError) or "permission denied" in low:
        return f"{what} {path} is not readable (permission denied): chmod u+r it"
    if "file signature not found" in low or "not an hdf5 file" in low:
        return f"{what} {path} is not an HDF5 file: {fix}"
    if "truncated file" in low or ("eof" in low and "addr" in low):
        return f"{what} {path} is truncated (shorter than its HDF5 metadata says): {fix}"
    if "required filter" in low or "can't open directory" in low:
        return (
            f"{what} {path} uses an HDF5 filter this h5py cannot decode ({_first_line(e)}): "
            "rewrite it with gzip compression (e.g. h5repack -f GZIP=4 IN OUT)"
        )
    return f"{what} {path} is damaged or unreadable ({type(e).__name__}: {_first_line(e)}): {fix}"


@contextlib.contextmanager
def h5_errors(path: str | os.PathLike, what: str, fix: str) -> Iterator[None]:
    """Turn any error inside the block (h5py, the OS, NumPy on damaged data) into one line."""
    try:
        yield
    except UsageError:
        raise
    except MemoryError:
        raise UsageError(
            f"{what} {path}: reading it ran out of memory; free memory or use a smaller file"
        ) from None
    except Exception as e:  # h5py reports damage as OSError, KeyError, ValueError, ...
        raise UsageError(describe_h5_error(e, Path(path), what, fix)) from None


def open_h5(path: str | os.PathLike, what: str, fix: str, damaged: str | None = None) -> Any:
    """An h5py.File opened read-only after `check_file`, its links and datasets scanned
    (`scan_h5`); any failure is a UsageError naming the file, ending in `fix` (for a path that
    is not a readable file) or `damaged` (default: fix) for a file HDF5 cannot use. Close it
    (use `with`)."""
    import h5py

    p = check_file(path, what, fix)
    damaged = damaged or fix
    probe_h5(p, what, damaged)
    with h5_errors(p, what, damaged):
        f = h5py.File(p, "r")
    try:
        scan_h5(f, p, what, damaged)
    except BaseException:
        f.close()
        raise
    return f


def _read_metadata(path: Path) -> None:
    """Everything HDF5 decodes from a file's metadata for our readers: the links, each object's
    attributes (names and values), each dataset's type, space, layout and chunk index."""
    import h5py

    with h5py.File(path, "r") as f:
        names: list[str] = []

        def visit(name: bytes, info: Any) -> int | None:
            if info.type == h5py.h5l.TYPE_HARD:
                names.append(name.decode("utf-8", "replace"))
            return 1 if len(names) > MAX_OBJECTS else None

        f.id.links.visit(visit, info=True)
        for obj in [f, *(f.get(n) for n in names[:MAX_OBJECTS])]:
            for key in obj.attrs:
                aid = obj.attrs.get_id(key)
                if aid.shape is not None and shape_bytes(aid.shape, 1) <= MAX_ATTR_BYTES:
                    _ = obj.attrs[key]
            if isinstance(obj, h5py.Dataset):
                _ = (obj.shape, obj.dtype)
                dcpl = obj.id.get_create_plist()
                if dcpl.get_layout() == h5py.h5d.CHUNKED and obj.shape:
                    obj.id.get_num_chunks()


def probe_h5(path: Path, what: str, fix: str) -> None:
    """Read the file's metadata first in a forked child with a time limit: damaged metadata can
    make the HDF5 library loop forever or crash (seen: a corrupted global heap under a string
    attribute) inside C code, where no Python watchdog can interrupt it. A child that does not
    finish in PROBE_SECONDS, or dies of a signal, gets the file refused. Skipped where fork is
    unavailable, and under a launcher with several ranks (MPI and fork do not mix; there the
    collective watchdog bounds a stuck rank)."""
    from distcnn.launcher import launched_ranks

    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _PROBED:  # this very file was probed already (e.g. its train, then its test split)
        return
    if launched_ranks() > 1 or not hasattr(os, "fork"):
        _probe_in_new_process(path, what, fix)
        _PROBED.add(key)
        return
    import time

    pid = os.fork()
    if pid == 0:  # the child: read, then leave without running any parent cleanup
        code = 0
        try:
            _read_metadata(path)
        except BaseException:  # errors are found and reported by the parent's own reading
            code = 3
        os._exit(code)
    deadline = time.monotonic() + PROBE_SECONDS
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise UsageError(
                f"{what} {path}: reading its HDF5 metadata did not finish in {PROBE_SECONDS:g} s "
                f"(damaged metadata makes the HDF5 library loop): {fix}"
            )
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        raise UsageError(
            f"{what} {path}: reading its HDF5 metadata crashes the HDF5 library (signal "
            f"{os.WTERMSIG(status)}; the file is damaged): {fix}"
        )
    if len(_PROBED) > 256:
        _PROBED.clear()
    _PROBED.add(key)


def _probe_in_new_process(path: Path, what: str, fix: str) -> None:
    """probe_h5 for a rank of an MPI job: a fresh Python (fork then exec, which MPI tolerates,
    unlike a fork that goes on running) reads the metadata; ~0.3 s, once per file."""
    import subprocess
    import sys

    code = "import sys; from distcnn.safefile import _read_metadata as r; r(sys.argv[1])"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=PROBE_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise UsageError(
            f"{what} {path}: reading its HDF5 metadata did not finish in {PROBE_SECONDS:g} s "
            f"(damaged metadata makes the HDF5 library loop): {fix}"
        ) from None
    except OSError:  # cannot start a process: read without the probe
        return
    if r.returncode < 0:
        raise UsageError(
            f"{what} {path}: reading its HDF5 metadata crashes the HDF5 library (signal "
            f"{-r.returncode}; the file is damaged): {fix}"
        )


def scan_h5(f: Any, path: Path, what: str, fix: str) -> None:
    """Refuse data outside the file: external links, external raw storage, virtual datasets;
    and user-defined links and files of more than MAX_OBJECTS links. Nothing is followed."""
    import h5py

    links: list[tuple[str, int]] = []

    def visit(name: bytes, info: Any) -> int | None:
        links.append((name.decode("utf-8", "replace"), info.type))
        return 1 if len(links) > MAX_OBJECTS else None  # non-None stops the visit

    with h5_errors(path, what, fix):
        f.id.links.visit(visit, info=True)
    if len(links) > MAX_OBJECTS:
        raise UsageError(
            f"{what} {path} holds more than {MAX_OBJECTS:,} HDF5 objects; distcnn files hold a "
            f"few dozen: {fix}"
        )
    for name, kind in links:
        if kind == h5py.h5l.TYPE_EXTERNAL:
            raise UsageError(
                f"{what} {path}: /{name} is an external link to another file; distcnn reads "
                "only data inside the file itself: copy the data in (h5copy, or h5py "
                "f[name] = other[name][()])"
            )
        if kind not in (h5py.h5l.TYPE_HARD, h5py.h5l.TYPE_SOFT):
            raise UsageError(f"{what} {path}: /{name} is a user-defined HDF5 link: {fix}")
    with h5_errors(path, what, fix):
        for name, kind in links:
            if kind != h5py.h5l.TYPE_HARD:
                continue
            obj = f.get(name)  # hard links only: nothing outside the file is opened
            if isinstance(obj, h5py.Dataset):
                _check_storage(obj, path, what, name)


def _check_storage(ds: Any, path: Path, what: str, name: str) -> None:
    import h5py

    dcpl = ds.id.get_create_plist()
    if dcpl.get_layout() == h5py.h5d.VIRTUAL:
        raise UsageError(
            f"{what} {path}: /{name} is a virtual dataset whose data lives in other files; "
            "distcnn reads only data inside the file itself: write the data into the file"
        )
    if dcpl.get_external_count() > 0:
        raise UsageError(
            f"{what} {path}: /{name} keeps its data in external raw files outside the HDF5 "
            "file; distcnn reads only data inside the file itself: write the data into the file"
        )


def dataset(f: Any, name: str, path: Path, what: str, fix: str) -> Any:
    """The h5py.Dataset at `name` (slash path) or None if there is none; UsageError if `name`
    is something else (a group, a dangling soft link)."""
    import h5py

    with h5_errors(path, what, fix):
        link = f.get(name, getlink=True)
        if link is None:
            return None
        obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        kind = "a group" if isinstance(obj, h5py.Group) else "a dangling link"
        raise UsageError(f"{what} {path}: /{name.lstrip('/')} is {kind}, not a dataset: {fix}")
    return obj


def check_dataset(ds: Any, path: Path, what: str, fix: str, whole: bool = True) -> int:
    """Bytes reading `ds` whole allocates, after refusing what cannot or must not be read: a
    null dataspace, external or virtual storage, an unavailable filter, unwritten chunks and,
    when it is to be read `whole`, more than memory_limit() bytes (a reader that streams it in
    pieces passes whole=False)."""
    import h5py

    name = ds.name
    with h5_errors(path, what, fix):
        shape = ds.shape
        if shape is None:
            raise UsageError(f"{what} {path}: {name} has a null dataspace (no data at all): {fix}")
        itemsize = ds.dtype.itemsize
        nbytes = shape_bytes(shape, itemsize)
        if whole:
            what_size = f"{what} {path}: {name}, declared {tuple(shape)} {ds.dtype},"
            require_bytes(nbytes, what_size, fix)
        _check_storage(ds, path, what, name)
        dcpl = ds.id.get_create_plist()
        for i in range(dcpl.get_nfilters()):
            code, _, _, fname = dcpl.get_filter(i)
            if not h5py.h5z.filter_avail(code):
                label = fname.decode("utf-8", "replace") if isinstance(fname, bytes) else fname
                raise UsageError(
                    f"{what} {path}: {name} is compressed with HDF5 filter {code} ({label}), "
                    "which this h5py cannot decode: rewrite it with gzip (e.g. h5repack -f "
                    "GZIP=4 IN OUT)"
                )
        if nbytes and dcpl.get_layout() == h5py.h5d.CHUNKED:
            chunk = dcpl.get_chunk()
            expected = math.prod(-(-int(s) // int(c)) for s, c in zip(shape, chunk, strict=True))
            have = ds.id.get_num_chunks()
            if have < expected:
                raise UsageError(
                    f"{what} {path}: {name}, declared {tuple(shape)} {ds.dtype} "
                    f"({fmt_bytes(nbytes)}), holds {have} of its {expected} chunks (the rest were "
                    f"never written and would read as zeros): the file is incomplete; {fix}"
                )
        elif nbytes and dcpl.get_layout() == h5py.h5d.CONTIGUOUS:
            if ds.id.get_storage_size() < nbytes:
                raise UsageError(
                    f"{what} {path}: {name} was never written (no storage for its "
                    f"{nbytes:,} bytes): {fix}"
                )
    return nbytes


def verify_chunks(ds: Any, path: Path, what: str, fix: str) -> None:
    """Check the zlib checksum (adler32) of every gzip-compressed chunk of `ds`: the HDF5
    library decodes a chunk whose checksum fails without an error, so a damaged chunk would
    otherwise read as other pixels. For an unfiltered chunked dataset, every stored chunk must
    have exactly a chunk's bytes (a damaged filter list makes compressed bytes read as pixels).
    Nothing to do with HDF5's own fletcher32 chunk checksums (HDF5 verifies those on every
    read) or other filters."""
    import h5py

    with h5_errors(path, what, fix):
        dcpl = ds.id.get_create_plist()
        if dcpl.get_layout() != h5py.h5d.CHUNKED or not ds.shape:
            return
        codes = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
        if not codes:  # unfiltered: every stored chunk holds exactly one chunk's bytes
            want = shape_bytes(dcpl.get_chunk(), ds.dtype.itemsize)
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                if info.size != want:
                    raise UsageError(
                        f"{what} {path}: {ds.name} stores {info.size} bytes for the chunk at "
                        f"{tuple(info.chunk_offset)} but an uncompressed chunk has {want} (its "
                        f"filter list or chunk index is damaged): {fix}"
                    )
            return
        if h5py.h5z.FILTER_DEFLATE not in codes or h5py.h5z.FILTER_FLETCHER32 in codes:
            return
        if codes[-1] != h5py.h5z.FILTER_DEFLATE:  # deflate must be the outermost filter
            return
        deflate_bit = 1 << (len(codes) - 1)
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            mask, raw = ds.id.read_direct_chunk(info.chunk_offset)
            if mask & deflate_bit:  # stored without compression (HDF5 may skip a filter)
                continue
            try:
                d = zlib.decompressobj()
                while raw:
                    d.decompress(raw, 1 << 20)
                    raw = d.unconsumed_tail
                if not d.eof:
                    raise zlib.error("the stream ends early")
            except zlib.error as e:
                raise UsageError(
                    f"{what} {path}: {ds.name} has a damaged chunk at {tuple(info.chunk_offset)} "
                    f"({e}): {fix}"
                ) from None


def read_dataset(ds: Any, path: Path, what: str, fix: str) -> Any:
    """`ds` read whole as a NumPy array, after `check_dataset` and `verify_chunks`; damage is
    one line."""
    check_dataset(ds, path, what, fix)
    verify_chunks(ds, path, what, fix)
    with h5_errors(path, what, fix):
        return ds[()]


def read_attr(obj: Any, key: str, path: Path, what: str, fix: str) -> Any:
    """Attribute `key` of an HDF5 object (None if absent), size-checked before it is read; an
    empty (null) attribute is refused."""
    import h5py

    with h5_errors(path, what, fix):
        if key not in obj.attrs:
            return None
        aid = obj.attrs.get_id(key)
        shape = aid.shape
        if shape is None:
            raise UsageError(f"{what} {path}: attribute {key!r} is empty (null dataspace): {fix}")
        size = shape_bytes(shape, aid.dtype.itemsize)
        if size > MAX_ATTR_BYTES:
            raise UsageError(
                f"{what} {path}: attribute {key!r} declares {fmt_bytes(size)}, more than the "
                f"{fmt_bytes(MAX_ATTR_BYTES)} any distcnn attribute needs: {fix}"
            )
        value = obj.attrs[key]
    if isinstance(value, h5py.Empty):
        raise UsageError(f"{what} {path}: attribute {key!r} is empty: {fix}")
    return value


@contextlib.contextmanager
def open_source(path: str | os.PathLike, what: str, fix: str = "check the path") -> Iterator[Any]:
    """A binary reader of a regular file, gunzipping it when it starts with the gzip magic;
    read(n) never produces more than n bytes, so a caller that reads a header first and then
    exactly the bytes it declares cannot be flooded by a decompression bomb."""
    import gzip

    p = check_file(path, what, fix)
    try:
        raw = open(p, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise UsageError(f"{what} {p} cannot be opened ({e.strerror or e}): {fix}") from None
    try:
        head = raw.read(2)
        raw.seek(0)
        reader = gzip.GzipFile(fileobj=raw, mode="rb") if head == _GZIP_MAGIC else raw
        try:
            yield reader
        except (OSError, EOFError, zlib.error) as e:
            raise UsageError(f"{what} {p} is not a valid gzip file ({e}): re-download it") from None
    finally:
        raw.close()


def npz_headers(path: str | os.PathLike, what: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{array name: (shape, dtype)} of a NumPy .npz, read from each member's .npy header only;
    refuses (before any array is allocated) a member whose header declares more bytes than the
    member holds or than memory_limit(), and object arrays."""
    import zipfile

    import numpy as np

    p = check_file(path, what, "give a NumPy .npz file")
    out: dict[str, tuple[tuple[int, ...], Any]] = {}
    fmt = np.lib.format
    try:
        with zipfile.ZipFile(p) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with z.open(info) as fp:
                    version = fmt.read_magic(fp)
                    if version == (1, 0):
                        shape, _, dtype = fmt.read_array_header_1_0(fp)
                    elif version == (2, 0):
                        shape, _, dtype = fmt.read_array_header_2_0(fp)
                    else:
                        shape, _, dtype = fmt._read_array_header(fp, version)
                    header = fp.tell()
                if dtype.hasobject:
                    raise UsageError(
                        f"{what} {p}: array {name!r} holds Python objects, which distcnn does not "
                        "unpickle: save numeric arrays"
                    )
                nbytes = shape_bytes(shape, dtype.itemsize)
                require_bytes(
                    nbytes, f"{what} {p}: array {name!r}, declared {tuple(shape)} {dtype},",
                    "give a smaller array, or check the file is not damaged",
                )  # fmt: skip
                if header + nbytes > info.file_size:
                    raise UsageError(
                        f"{what} {p}: array {name!r} declares {tuple(shape)} {dtype} "
                        f"({fmt_bytes(nbytes)}) but holds {fmt_bytes(info.file_size - header)}: "
                        "the file is truncated or damaged; save it again with np.savez"
                    )
                out[name] = (tuple(int(d) for d in shape), dtype)
    except UsageError:
        raise
    except Exception as e:  # zipfile reports damage as BadZipFile, NotImplementedError, ...
        raise UsageError(
            f"cannot read {p} as .npz ({type(e).__name__}: {_first_line(e)}): give a NumPy .npz "
            "file"
        ) from None
    return out
