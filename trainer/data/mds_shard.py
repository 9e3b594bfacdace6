"""One local MDS shard read through a read-only memory map, decoded exactly as streaming's `MDSReader`.

Streaming opens, seeks and reads the shard file for every sample; `ShardFile` maps it once and
copies each sample out of the map (see `trainer.data.mapped_dataset` for when a shard may be read so).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash
from streaming.base.format.mds import MDSReader
from streaming.base.format.mds.encodings import NDArray, mds_decode

# MDS stores its offsets and column sizes as numpy uint32 in native byte order: so does struct's "=".
_UINT32 = struct.Struct("=I")
_SAMPLE_SPAN = struct.Struct("=II")  # begin and end of sample i, at byte 4 + 4 * i of a shard
_SHAPE_DIM = {code: struct.Struct("=" + "BHIQ"[code]) for code in range(4)}  # NDArray's shape dtypes


class DamagedShardError(RuntimeError):
    """A local shard's bytes do not match the checksum in its index.json."""


def _ndarray_decoder(encoding: str) -> Callable[[bytes], np.ndarray]:
    """`NDArray.decode` of streaming for one column, its dtype and shape parsed once, not per sample."""
    coder = NDArray.from_str(encoding.partition(":")[2])
    fixed_dtype = np.dtype(coder.dtype) if coder.dtype else None
    fixed_shape = coder.shape
    value_dtypes = {code: np.dtype(name) for code, name in NDArray._int2value_dtype.items()}

    def decode(data: bytes) -> np.ndarray:
        index = 0
        dtype = fixed_dtype
        if dtype is None:
            dtype = value_dtypes[data[0]]
            index = 1
        if fixed_shape is not None:
            return np.frombuffer(data, dtype, offset=index).reshape(fixed_shape)
        byte = data[index]
        ndim, code = byte >> 2, byte % 4
        start = index + 1 + ndim * (1 << code)
        values = np.frombuffer(data, dtype, offset=start)
        if ndim == 1 and _SHAPE_DIM[code].unpack_from(data, index + 1)[0] == len(values):
            return values  # the common case, without building a shape array
        shape = np.frombuffer(data[index + 1 : start], NDArray._int2shape_dtype[code])
        return values.reshape(shape)  # raises as streaming does when the sizes disagree

    return decode


def _column_decoder(encoding: str) -> Callable[[bytes], Any]:
    if encoding == "bytes":
        return bytes
    if encoding == "ndarray" or encoding.startswith("ndarray:"):
        return _ndarray_decoder(encoding)
    return lambda data: mds_decode(encoding, data)  # streaming's own decoder for everything else


def _sample_decoder(reader: MDSReader) -> Callable[[bytes], dict[str, Any]]:
    """`MDSReader.decode_sample`: the 4-byte sizes of the variable-size columns, then the columns."""
    columns = [
        (name, size or None, _column_decoder(encoding))
        for name, encoding, size in zip(
            reader.column_names, reader.column_encodings, reader.column_sizes, strict=True
        )
    ]
    if len(columns) == 1 and columns[0][1] is None:  # the usual one variable-size `tokens` column
        name, _, decode_one = columns[0]

        def decode_single(data: bytes) -> dict[str, Any]:
            (size,) = _UINT32.unpack_from(data)
            return {name: decode_one(data[4 : 4 + size])}

        return decode_single
    header = 4 * sum(size is None for _, size, _ in columns)

    def decode(data: bytes) -> dict[str, Any]:
        sample, index, start = {}, 0, header
        for name, size, decode_column in columns:
            if size is None:
                (size,) = _UINT32.unpack_from(data, index)
                index += 4
            sample[name] = decode_column(data[start : start + size])
            start += size
        return sample

    return decode


class ShardFile:
    """The raw (uncompressed or already decompressed) file of a local MDS shard, memory-mapped read-only.

    Sample i of a shard with n samples: bytes 0-4 hold n, bytes 4+4i and 8+4i the sample's begin
    and end in the file; the sample is the 4-byte sizes of its variable-size columns, then each
    column's bytes. Samples are copied out of the map (they are a few KB), so no buffer of the
    map stays exported: the map is closed as soon as the last reference to this object goes.
    """

    def __init__(self, path: str, reader: MDSReader) -> None:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size != reader.raw_data.bytes:
                raise ValueError(f"{path} is not the size its index.json gives")
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            status = os.fstat(file.fileno())
        self._file_id = (status.st_dev, status.st_ino)
        if _UINT32.unpack_from(self._map)[0] != reader.samples:
            self._map.close()
            raise ValueError(f"{path} does not hold the sample count its index.json gives")
        self._verify(path, reader.raw_data.hashes or {})
        self._decode = _sample_decoder(reader)

    def _verify(self, path: str, hashes: dict[str, str]) -> None:
        """Check the shard against the xxh64 (else sha1) checksum its index.json records, once per process."""
        if "xxh64" in hashes:
            algorithm, actual = "xxh64", xxhash.xxh64(self._map).hexdigest()
        elif "sha1" in hashes:
            algorithm, actual = "sha1", hashlib.sha1(self._map).hexdigest()
        else:
            return
        if actual != hashes[algorithm]:
            self._map.close()
            raise DamagedShardError(
                f"a shard could not be read: {path} does not match the {algorithm} checksum in its "
                "index.json (altered or damaged)"
            )

    def sample(self, index: int) -> dict[str, Any]:
        begin, end = _SAMPLE_SPAN.unpack_from(self._map, 4 + 4 * index)
        data = self._map[begin:end]
        if not data:
            raise IndexError(f"sample {index} is not present in the shard file")
        return self._decode(data)

    def is_at(self, path: str) -> bool:
        """Whether the mapped file is (still) the file at `path`."""
        try:
            status = os.stat(path)
        except OSError:
            return False
        return (status.st_dev, status.st_ino) == self._file_id

    def close(self) -> None:
        self._map.close()
