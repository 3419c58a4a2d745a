"""Files over gRPC streams, one way for every service: a download goes out as 1 MiB
FileChunks, an upload is gathered from its chunks under a size cap.

Upload messages carry a `part` oneof: `chunk` (a FileChunk, in order) and, for some, a first
message with other fields (a display name), handed back by name.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from minehead.common.v1 import common_pb2
from minehead.core.errors import InvalidArgument

CHUNK_BYTES = 1 << 20


def file_chunks(data: bytes) -> Iterator[common_pb2.FileChunk]:
    """A server stream's messages for one file."""
    for i in range(0, len(data), CHUNK_BYTES):
        yield common_pb2.FileChunk(data=data[i:i + CHUNK_BYTES])


def gather_chunks(parts: Iterable, max_bytes: int, too_large: str) -> tuple[bytes, dict]:
    """(the upload's bytes, the other fields of its `part` oneof by name). INVALID_ARGUMENT
    `too_large` as soon as the bytes pass max_bytes."""
    data, fields = bytearray(), {}
    for part in parts:
        which = part.WhichOneof("part")
        if which in (None, "chunk"):
            data += part.chunk.data
            if len(data) > max_bytes:
                raise InvalidArgument(too_large)
        else:
            fields[which] = getattr(part, which)
    return bytes(data), fields
