"""Reading a tar stream member by member, with every header read and bounded here.

Bundles are untrusted input, so their headers are parsed by this module rather than by
``tarfile``: a guard that hooked into ``tarfile`` internals (``TarInfo.frombuf``) held on one
patch level of Python and not on another (Debian bookworm's 3.11.2 with its security updates
reads extended headers before that hook runs), so a bundle with a gigabyte pax header made
verify buffer all of it. Here an extended header (pax ``x``/``g``, GNU long name/link ``L``/``K``)
larger than :data:`MAX_EXTENDED_HEADER` is refused from its header block alone, before one byte
of it is read, on any Python.

What is understood: ustar and GNU headers (octal or base-256 sizes), pax ``path``, ``linkpath``
and ``size`` records, GNU long names. Everything else in a header is ignored: a bundle member
is a name, a type and bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from manifests.errors import TrustError

BLOCK = 512
#: Extended headers carry only a name or a few attributes in a bundle.
MAX_EXTENDED_HEADER = 64 << 10
#: More extended headers than this in a row before a member is not a bundle.
MAX_EXTENDED_CHAIN = 8

REGULAR_TYPES = (b"0", b"\0", b"7")  # '7' is a contiguous file: a regular file to readers
SYMLINK_TYPE = b"2"
HARDLINK_TYPE = b"1"
_PAX_TYPES = (b"x", b"g", b"X")  # X: Solaris' extended header
_GNU_LONG_TYPES = (b"L", b"K")


class TarFormatError(TrustError):
    """The stream is not a well-formed tar archive (or one no bundle writer produces)."""


@dataclass(frozen=True)
class TarMember:
    name: str
    size: int
    type: bytes  # the typeflag byte
    linkname: str

    def isreg(self) -> bool:
        return self.type in REGULAR_TYPES

    def issym(self) -> bool:
        return self.type == SYMLINK_TYPE

    def islnk(self) -> bool:
        return self.type == HARDLINK_TYPE


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise TarFormatError("unexpected end of archive")
        data += chunk
    return data


def _number(field: bytes, what: str) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (high bit set)."""
    if field[:1] and field[0] & 0x80:
        if field[0] == 0xFF:
            raise TarFormatError(f"negative {what} in a tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(0x30 <= c <= 0x37 for c in text):
        raise TarFormatError(f"invalid {what} in a tar header")
    return int(text, 8)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _check_sum(block: bytes) -> None:
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 0x20
    if stored not in (unsigned, signed):
        raise TarFormatError("bad checksum in a tar header")


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<len> key=value\\n"`` records; a malformed one is an error, not a guess."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise TarFormatError("malformed pax record")
        length = int(data[pos:space])
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError("malformed pax record")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class TarReader:
    """Iterate a tar stream's members; read each member's data before asking for the next.

    ``read_member`` yields the current member's bytes in chunks (and skips its padding);
    members whose data is not read are skipped when the next one is requested.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._left = 0  # data bytes of the current member not yet consumed
        self._pad = 0
        self._started = False

    def _skip_rest(self) -> None:
        while self._left:
            self._left -= len(_read_exact(self._stream, min(self._left, 1 << 20)))
        if self._pad:
            _read_exact(self._stream, self._pad)
            self._pad = 0

    def _extended(self, size: int) -> bytes:
        if size > MAX_EXTENDED_HEADER:
            raise TarFormatError(f"extended tar header of {size} bytes")
        data = _read_exact(self._stream, size)
        _read_exact(self._stream, -size % BLOCK)
        return data

    def members(self) -> Iterator[TarMember]:
        while True:
            self._skip_rest()
            member = self._next()
            if member is None:
                return
            yield member

    def _next(self) -> TarMember | None:
        pax: dict[str, str] = {}
        long_name: str | None = None
        long_link: str | None = None
        for _ in range(MAX_EXTENDED_CHAIN + 1):
            block = self._stream.read(BLOCK)
            while block and len(block) < BLOCK:
                more = self._stream.read(BLOCK - len(block))
                if not more:
                    break
                block += more
            if not block and not self._started:
                raise TarFormatError("empty file")
            self._started = True
            if not block or block == bytes(BLOCK):
                return None  # end of archive (one zero block suffices, as for tarfile)
            if len(block) < BLOCK:
                raise TarFormatError("truncated tar header")
            _check_sum(block)
            typeflag = block[156:157]
            size = _number(block[124:136], "size")
            if typeflag in _PAX_TYPES:
                records = _pax_records(self._extended(size))
                if typeflag != b"g":  # a global header's records do not name the next member
                    pax.update(records)
                continue
            if typeflag in _GNU_LONG_TYPES:
                value = self._extended(size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if typeflag == b"L":
                    long_name = value
                else:
                    long_link = value
                continue
            name = _text(block[0:100])
            if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
                name = _text(block[345:500]) + "/" + name
            name = pax.get("path", long_name if long_name is not None else name)
            linkname = pax.get("linkpath", long_link if long_link is not None else _text(block[157:257]))
            if "size" in pax:
                if not pax["size"].isascii() or not pax["size"].isdigit():
                    raise TarFormatError("invalid size in a pax header")
                size = int(pax["size"])
            has_data = typeflag not in (SYMLINK_TYPE, HARDLINK_TYPE, b"3", b"4", b"5", b"6")
            self._left = size if has_data else 0
            self._pad = -self._left % BLOCK
            return TarMember(name=name, size=size, type=typeflag, linkname=linkname)
        raise TarFormatError(f"more than {MAX_EXTENDED_CHAIN} extended headers before one member")

    def read_member(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The current member's data, in chunks of at most ``chunk`` bytes."""
        while self._left:
            data = self._stream.read(min(self._left, chunk))
            if not data:
                raise TarFormatError("unexpected end of archive")
            self._left -= len(data)
            yield data
        if self._pad:
            _read_exact(self._stream, self._pad)
            self._pad = 0

    def read_all(self, limit: int) -> bytes:
        """The current member's data whole; the caller has checked its size against ``limit``."""
        if self._left > limit:
            raise TarFormatError("member larger than allowed")
        return b"".join(self.read_member())
