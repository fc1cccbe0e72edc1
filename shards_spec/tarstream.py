"""A tar reader for untrusted streams that checks every size before it reads or allocates.

Python's `tarfile` reads a PAX extended header or a GNU long name whole, whatever size its
header declares: a 1 MB gzip shard declaring a 1 GiB PAX header took `etl verify` to 3.2 GB.
This reader parses the 512-byte headers itself (ustar, GNU and PAX, as `tarfile` writes them),
and before reading any bytes refuses

- an extended header (PAX `x`/`g`, GNU `L`/`K`) larger than `limits.MAX_TAR_HEADER_BYTES`;
- a member that is not a regular file (links, folders, devices, FIFOs, sparse files);
- a member larger than the caller's limit for its name (`limit(name) -> bytes`);
- a stream that would take more than `max_total` bytes in all (headers, data and padding), which
  also bounds the time spent decompressing a gzip bomb.

Each member's data is read into a buffer of exactly its declared size, or, when the archive is
given whole in memory (a bytearray: a local shard read and verified at once), is a view of it,
never a copy. The archive ends at the first all-zero block, as `tarfile` in stream mode ends it.
Every refusal is a `SpecError`.
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Iterator

from .errors import SpecError
from .limits import MAX_TAR_HEADER_BYTES

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")
EXTENDED = (b"x", b"g", b"L", b"K")


class _Counted:
    """Reads from a stream, never more than `max_total` bytes in all."""

    def __init__(self, stream: BinaryIO, max_total: int | None, name: str) -> None:
        self.stream, self.max_total, self.name, self.used = stream, max_total, name, 0

    def read_exact(self, n: int, what: str) -> bytearray | None:
        """`n` bytes, None at a clean end of stream before any byte; a short read is an error."""
        if self.max_total is not None and self.used + n > self.max_total:
            raise SpecError(f"the tar stream holds more than the {self.max_total} bytes its records can need", self.name)
        buffer = bytearray(n)
        view = memoryview(buffer)
        got = 0
        while got < n:
            k = self.stream.readinto(view[got:])
            if not k:
                break
            got += k
        self.used += got
        if got == 0 and n:
            return None
        if got != n:
            raise SpecError(f"{what} is truncated", self.name)
        return buffer


class _InMemory:
    """An archive held whole in memory: each read is a view of it (no copy), with `_Counted`'s checks."""

    def __init__(self, data: bytes | bytearray | memoryview, max_total: int | None, name: str) -> None:
        self.data, self.max_total, self.name, self.used = memoryview(data).cast("B"), max_total, name, 0

    def read_exact(self, n: int, what: str) -> memoryview | None:
        if self.max_total is not None and self.used + n > self.max_total:
            raise SpecError(f"the tar stream holds more than the {self.max_total} bytes its records can need", self.name)
        start = self.used
        got = min(n, len(self.data) - start)
        self.used += got
        if got == 0 and n:
            return None
        if got != n:
            raise SpecError(f"{what} is truncated", self.name)
        return self.data[start:start + n]


def _number(field: bytes, what: str) -> int:
    """A numeric header field: octal text, or base-256 when the first byte has its top bit set."""
    if field[:1] and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value if field[0] == 0x80 else -1  # 0xff: negative, never a valid size
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise SpecError(f"tar header field {what} is not a number ({bytes(field)!r})") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytearray | memoryview) -> bool:
    stated = _number(bytes(header[148:156]), "chksum")
    blanked = bytes(header[:148]) + b" " * 8 + bytes(header[156:])
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stated in (unsigned, signed)


def _pax(data: bytearray, name: str) -> dict[str, str]:
    """PAX records `<length> <key>=<value>\\n`."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            length = 0
        record = data[space + 1:pos + length] if space > pos and length > 0 else b""
        if not record.endswith(b"\n") or b"=" not in record:
            raise SpecError("a PAX extended header is malformed", name)
        key, _, value = bytes(record[:-1]).partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_members(
    stream: BinaryIO | bytes | bytearray | memoryview, *, limit: Callable[[str], int], max_total: int | None = None,
    name: str = "shard",
) -> Iterator[tuple[str, bytearray | memoryview]]:
    """Yield (member name, data) of each regular member, checking sizes before reading them.

    `stream` is a binary stream, or the whole archive in memory; members of an archive in memory
    are views of it."""
    in_memory = isinstance(stream, (bytes, bytearray, memoryview))
    source = _InMemory(stream, max_total, name) if in_memory else _Counted(stream, max_total, name)
    pending: dict[str, str] = {}
    while True:
        header = source.read_exact(BLOCK, "a tar header")
        if header is None or not any(header):
            return  # end of archive (a missing end-of-archive block is tolerated, as tarfile does)
        if not _checksum_ok(header):
            raise SpecError("not a complete tar archive (a header's checksum is wrong)", name)
        kind = bytes(header[156:157])
        size = _number(bytes(header[124:136]), "size")
        if kind in EXTENDED:
            data = _extended(source, kind, size, name)
            if kind == b"x":
                pending.update(_pax(data, name))
            elif kind == b"L":
                pending["path"] = bytes(data).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"g" and {"path", "size"} & set(_pax(data, name)):
                raise SpecError("a global PAX header sets a path or size for every member (refused)", name)
            continue
        member = pending.get("path") or _ustar_name(header)
        if "size" in pending:
            size = _pax_size(pending["size"], member, name)
        pending = {}
        if kind not in REGULAR:
            raise SpecError(f"member {member!r} is not a regular file (links and folders are refused)", name)
        allowed = limit(member)
        if not 0 <= size <= allowed:
            raise SpecError(f"member {member!r} declares {size} bytes, more than the {allowed} allowed", name)
        data = source.read_exact(size, f"member {member!r}")
        if data is None and size:
            raise SpecError(f"member {member!r} is truncated", name)
        _skip_padding(source, size, member)
        yield member, data if data is not None else bytearray()


def _extended(source: _Counted | _InMemory, kind: bytes, size: int, name: str) -> bytearray:
    if not 0 <= size <= MAX_TAR_HEADER_BYTES:
        label = "PAX extended header" if kind in (b"x", b"g") else "GNU long name"
        raise SpecError(f"a {label} declares {size} bytes, more than the {MAX_TAR_HEADER_BYTES} allowed", name)
    data = source.read_exact(size, "an extended tar header") if size else bytearray()
    if data is None:
        raise SpecError("an extended tar header is truncated", name)
    _skip_padding(source, size, "an extended tar header")
    return bytearray(data)  # at most 64 KiB: parsed as text


def _pax_size(text: str, member: str, name: str) -> int:
    if not text.isdigit() or len(text) > 20:
        raise SpecError(f"member {member!r} has a PAX size that is not a number ({text[:30]!r})", name)
    return int(text)


def _ustar_name(header: bytearray | memoryview) -> str:
    name = _text(bytes(header[0:100]))
    prefix = _text(bytes(header[345:500])) if bytes(header[257:263]) == b"ustar\x00" else ""
    return f"{prefix}/{name}" if prefix else name


def _skip_padding(source: _Counted | _InMemory, size: int, what: str) -> None:
    pad = -size % BLOCK
    if pad and source.read_exact(pad, what) is None:
        raise SpecError(f"{what} is truncated", source.name)
