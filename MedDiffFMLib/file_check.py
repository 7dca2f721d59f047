"""Checks that an image file holds all the voxel data its header promises.

SimpleITK reads a truncated ``.nii.gz`` as a volume that is mostly zeros, without an error, and
some truncated NRRD, MetaImage and DICOM files the same way. Before such a file is used as data,
:func:`check_complete` reads its header, works out how many voxel bytes must follow, and checks
that they are there (for compressed data: that the stream decompresses to that many bytes and ends
cleanly with a valid checksum). It reads the file once, in 1 MiB chunks, and keeps nothing.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from .errors import ReadError

CHUNK = 1 << 20

NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), 2),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int"), 8),
    **dict.fromkeys(("int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int"), 8),
    **dict.fromkeys(("uint64", "uint64_t"), 8),
    "float": 4,
    "double": 8,
}
"""Bytes per value of each NRRD ``type`` spelling (NRRD file format 0005)."""

META_TYPE_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
"""Bytes per value of each MetaImage ``ElementType``."""

PIXEL_DATA_TAG = struct.pack("<HH", 0x7FE0, 0x0010)
PIXEL_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"}
UNDEFINED_LENGTH = 0xFFFFFFFF


def check_complete(path: str | os.PathLike) -> None:
    """Raise :class:`ReadError` if ``path`` (an image file) is truncated or its data is corrupt.

    Knows NIfTI-1/2 (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr`` with its data file),
    MetaImage (``.mha``, ``.mhd`` with its data file) and DICOM files; other files pass unchecked.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)
    elif name.endswith(".dcm") or is_dicom_file(path):
        check_dicom_file(path)


def _fail(path: Path, problem: str) -> ReadError:
    return ReadError(
        f"'{path}' is incomplete or corrupt: {problem}. The file was probably cut short while copying or "
        "downloading; copy or export it again."
    )


def _chunks(stream) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


def _require(path: Path, available: int, needed: int, what: str) -> None:
    if available < needed:
        raise _fail(path, f"{what} holds {available:,} bytes of voxel data, its header describes {needed:,}")


def _decompressed_size(path: Path, opener, offset: int = 0) -> int:
    """Bytes a gzip/bzip2 stream (from ``offset``) decompresses to; raises if it is cut or corrupt."""
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            with opener(raw) as stream:
                return sum(len(chunk) for chunk in _chunks(stream))
    except (EOFError, OSError, zlib.error, ValueError) as error:
        raise _fail(path, f"its compressed data cannot be decompressed ({error})") from error


def _zlib_size(path: Path, offset: int) -> int:
    """Bytes a zlib (or gzip) stream starting at ``offset`` decompresses to; raises if it is cut."""
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 32)
    total = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            for chunk in _chunks(raw):
                total += len(decompressor.decompress(chunk))
                if decompressor.eof:
                    break
            total += len(decompressor.flush())
    except zlib.error as error:
        raise _fail(path, f"its compressed data is corrupt ({error})") from error
    if not decompressor.eof:
        raise _fail(path, "its compressed data ends before the end of the stream")
    return total


# --- NIfTI ----------------------------------------------------------------------------------------


def _check_nifti(path: Path) -> None:
    import nibabel

    try:
        data = nibabel.load(str(path)).dataobj
    except Exception:  # not a NIfTI header nibabel knows: SimpleITK reports what it is
        return
    needed = int(data.offset) + math.prod(data.shape) * data.dtype.itemsize
    if path.name.lower().endswith(".gz"):
        available = _decompressed_size(path, lambda raw: gzip.GzipFile(fileobj=raw))
    else:
        available = path.stat().st_size
    _require(path, available, needed, "the file")


# --- NRRD -----------------------------------------------------------------------------------------


def _text_header(path: Path, end_of_header) -> tuple[list[str], int]:
    """Header lines of a text-headed file and the byte offset where its data starts."""
    lines, offset = [], 0
    with open(path, "rb") as stream:
        for raw in stream:
            offset += len(raw)
            line = raw.decode("latin-1").rstrip("\r\n")
            if end_of_header(line):
                return lines + [line], offset
            lines.append(line)
            if offset > 1 << 20:
                break
    return lines, offset


def _check_nrrd(path: Path) -> None:
    lines, data_start = _text_header(path, lambda line: line == "")
    if not lines or not lines[0].startswith("NRRD"):
        raise _fail(path, "it does not start with an NRRD magic line")
    fields = {}
    for line in lines[1:]:
        if ":" in line and not line.startswith("#") and ":=" not in line:
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
    value_bytes = NRRD_TYPE_BYTES.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "raw").lower()
    if value_bytes is None or encoding not in ("raw", "gzip", "gz", "bzip2", "bz2") or "sizes" not in fields:
        return
    needed = math.prod(int(size) for size in fields["sizes"].split()) * value_bytes
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file is not None:
        if data_file.startswith("LIST") or " " in data_file:
            return
        target = (path.parent / data_file) if not os.path.isabs(data_file) else Path(data_file)
        if not target.exists():
            raise ReadError(f"'{path}' names the data file '{data_file}', which does not exist next to it.")
        path, data_start = target, 0
    skip = int(fields.get("byte skip", "0"))
    if encoding == "raw":
        available = path.stat().st_size - data_start - max(skip, 0)
    elif encoding in ("gzip", "gz"):
        available = _zlib_size(path, data_start)
    else:
        available = _decompressed_size(path, lambda raw: bz2.BZ2File(raw), data_start)
    _require(path, available, needed, "the file")


# --- MetaImage ------------------------------------------------------------------------------------


def _check_metaimage(path: Path) -> None:
    lines, data_start = _text_header(path, lambda line: line.replace(" ", "").lower().startswith("elementdatafile="))
    fields = {}
    for line in lines:
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip().lower()] = value.strip()
    value_bytes = META_TYPE_BYTES.get(fields.get("elementtype", "").upper())
    data_file = fields.get("elementdatafile")
    if value_bytes is None or data_file is None or "dimsize" not in fields:
        return
    channels = int(fields.get("elementnumberofchannels", "1"))
    needed = math.prod(int(size) for size in fields["dimsize"].split()) * value_bytes * channels
    if data_file != "LOCAL":
        if data_file.upper().startswith("LIST") or "%" in data_file or " " in data_file:
            return
        target = path.parent / data_file
        if not target.exists():
            raise ReadError(f"'{path}' names the data file '{data_file}', which does not exist next to it.")
        path, data_start = target, 0
    header_size = int(fields.get("headersize", "0"))
    if fields.get("compresseddata", "false").lower() == "true":
        available = _zlib_size(path, data_start + max(header_size, 0))
    else:
        available = path.stat().st_size - data_start - max(header_size, 0)
    _require(path, available, needed, "the file")


# --- DICOM ----------------------------------------------------------------------------------------


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` starts with the DICOM preamble (``DICM`` after 128 bytes)."""
    try:
        with open(path, "rb") as stream:
            stream.seek(128)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def check_dicom_file(path: str | os.PathLike) -> None:
    """Raise :class:`ReadError` if a DICOM file ends before its pixel data does.

    Finds the Pixel Data element (7FE0,0010), explicit or implicit VR little endian, and checks
    that its value (or, for encapsulated data, every fragment up to the sequence delimiter) lies
    inside the file. A file whose Pixel Data element is missing altogether is reported too.
    """
    path = Path(path)
    data = path.read_bytes()
    start = data.find(PIXEL_DATA_TAG, 132 if data[128:132] == b"DICM" else 0)
    if start < 0:
        raise _fail(path, "it has no pixel data")
    if data[start + 4 : start + 6] in PIXEL_VRS and data[start + 6 : start + 8] == b"\0\0":
        length_at, value = start + 8, start + 12
    else:
        length_at, value = start + 4, start + 8
    if value > len(data):
        raise _fail(path, "it ends inside the pixel data header")
    length = struct.unpack_from("<I", data, length_at)[0]
    if length == UNDEFINED_LENGTH:
        _check_fragments(path, data, value)
    elif value + length > len(data):
        raise _fail(path, f"its pixel data needs {length:,} bytes, {len(data) - value:,} are present")


def _check_fragments(path: Path, data: bytes, offset: int) -> None:
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        if (group, element) == (0xFFFE, 0xE0DD):
            return
        if (group, element) != (0xFFFE, 0xE000) or offset + 8 + length > len(data):
            break
        offset += 8 + length
    raise _fail(path, "its compressed pixel data ends before the last fragment")
