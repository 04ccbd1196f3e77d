"""Tar archives read without losing members in silence.

Past the first header, `tarfile` ends an archive's listing quietly at a header it cannot
read: a damaged checksum, a block cut short, or data that stops where the next header should
be, with no end-of-archive marker. Every member after that point would be lost without a
trace. `open_tar` opens an archive whose headers note the reason (`damage`) instead.
"""

from __future__ import annotations

import struct
import tarfile
from typing import IO

EXTENDED_HEADER_MAX_BYTES = 2**20
"""The largest extended header (a GNU long name or link, a pax header) read: `tarfile`
reads one whole before its member, at any size it declares, and a small compressed archive
may declare gigabytes. A longer one is damage: the listing ends there."""
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
             tarfile.SOLARIS_XHDTYPE)  # fmt: skip


class _NotedTarInfo(tarfile.TarInfo):
    """A TarInfo whose failed header reads leave their reason on the archive, and whose
    extended headers are read only up to `EXTENDED_HEADER_MAX_BYTES`."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED and self.size > EXTENDED_HEADER_MAX_BYTES:
            raise tarfile.InvalidHeaderError(
                f"an extended header of {self.size} bytes, above {EXTENDED_HEADER_MAX_BYTES}"
            )
        return super()._proc_member(archive)

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:  # a block of zeros: the end-of-archive marker
            raise
        except tarfile.EmptyHeaderError:
            archive.damage = "the archive stops without its end-of-archive marker"
            raise
        except tarfile.HeaderError as e:
            archive.damage = f"damaged header ({e})"
            raise


def open_tar(fileobj: IO[bytes], mode: str = "r:") -> tarfile.TarFile:
    """`tarfile.open` on `fileobj`; after a listing, `damage(archive)` says whether it ended
    early (raises `tarfile.ReadError` where the first header is unreadable, or a gzip
    stream's header is cut short: tarfile's stream reader then fails with a TypeError)."""
    try:
        return tarfile.open(fileobj=fileobj, mode=mode, tarinfo=_NotedTarInfo)
    except (TypeError, struct.error) as e:
        raise tarfile.ReadError(f"damaged compressed stream header: {type(e).__name__}: {e}") from e


def damage(archive: tarfile.TarFile) -> str | None:
    """Why the listing of `archive` ended before its end-of-archive marker, if it did."""
    return getattr(archive, "damage", None)


NOT_A_FILE = "archive member is not a regular file (link/device)"
DAMAGE_ERRORS = (tarfile.TarError, EOFError, ValueError, ArithmeticError)
"""What `tarfile` raises on a damaged archive: its own errors, and the parsing's of a header
field that is not a number (a pax ``GNU.sparse.map`` of letters, say)."""


def listing(archive: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], str | None]:
    """(the members `archive` lists, why the listing ended before its end-of-archive marker,
    or None): a damaged header, or data that stops inside a member."""
    listed: list[tarfile.TarInfo] = []
    try:
        listed.extend(archive)
    except DAMAGE_ERRORS as e:
        return listed, str(e) if isinstance(e, tarfile.TarError) else f"{type(e).__name__}: {e}"
    return listed, damage(archive)


def after(listed: list[tarfile.TarInfo]) -> str:
    """Where a listing broke off, for messages."""
    return f"after {listed[-1].name}" if listed else "at its start"
