"""Which files an ONNX model is made of: the ``.onnx`` and the external data it names.

A model over protobuf's 2 GB limit (or one torch's exporter writes with
``external_data=True``) keeps its tensors in files beside it; each tensor's
``external_data`` entries name the file by a path relative to the model's folder. To ship,
hash or copy a model, every such file must go with it. This reads the names straight from
the protobuf wire format (the runtime does not depend on the ``onnx`` package) and skips
over tensor bytes without reading them, so it costs little even for a 2 GB file.
"""

from __future__ import annotations

import contextlib
import mmap
from pathlib import Path, PurePosixPath

from ..errors import ModelFileError

# Field numbers (onnx.proto3): ModelProto.graph, ModelProto.functions; GraphProto.node,
# .initializer, .sparse_initializer; NodeProto.attribute; AttributeProto.t, .g, .tensors,
# .graphs; TensorProto.external_data; SparseTensorProto.values, .indices;
# StringStringEntryProto.key, .value; FunctionProto.node.
_MODEL_GRAPH, _MODEL_FUNCTIONS, _MODEL_METADATA = 7, 25, 14
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTR = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_TENSOR_EXTERNAL = 13
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_FUNCTION_NODE = 7


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, start, end) of each length-delimited field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed
            yield number, pos, pos + size
            pos += size
        else:
            raise _Malformed
    if pos != end:
        raise _Malformed


def _tensor_locations(buf, start, end, out: set[str]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number == _TENSOR_EXTERNAL:
            entry = {k: bytes(buf[a:b]) for k, a, b in _fields(buf, s, e)}
            if entry.get(1) == b"location" and 2 in entry:
                out.add(entry[2].decode("utf-8", "strict"))


def _graph_locations(buf, start, end, out: set[str]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number == _GRAPH_INIT:
            _tensor_locations(buf, s, e, out)
        elif number == _GRAPH_SPARSE:
            for n, a, b in _fields(buf, s, e):
                if n in (_SPARSE_VALUES, _SPARSE_INDICES):
                    _tensor_locations(buf, a, b, out)
        elif number == _GRAPH_NODE:
            _node_locations(buf, s, e, out)


def _node_locations(buf, start, end, out: set[str]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number != _NODE_ATTR:
            continue
        for n, a, b in _fields(buf, s, e):
            if n in (_ATTR_T, _ATTR_TENSORS):
                _tensor_locations(buf, a, b, out)
            elif n in (_ATTR_G, _ATTR_GRAPHS):
                _graph_locations(buf, a, b, out)


@contextlib.contextmanager
def _top_fields(path):
    """The file mapped read-only (not read), and an iterator over its ModelProto fields."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            yield b"", iter(())
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            yield buf, _fields(buf, 0, size)


def external_data_names(path) -> list[str]:
    """The external-data locations ``path`` names (relative to its folder), sorted."""
    path = Path(path)
    out: set[str] = set()
    try:
        with _top_fields(path) as (buf, fields):
            for number, s, e in fields:
                if number == _MODEL_GRAPH:
                    _graph_locations(buf, s, e, out)
                elif number == _MODEL_FUNCTIONS:
                    for n, a, b in _fields(buf, s, e):
                        if n == _FUNCTION_NODE:
                            _node_locations(buf, a, b, out)
    except (_Malformed, UnicodeDecodeError):
        raise ModelFileError(f"{path}: not an ONNX model (its protobuf is malformed); "
                             "export it again") from None
    return sorted(out)


def onnx_files(path) -> list[Path]:
    """The model file first, then each external-data file it names, all of which must exist
    inside the model's folder."""
    path = Path(path)
    files = [path]
    for name in external_data_names(path):
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ModelFileError(f"{path}: external data location {name!r} is outside the "
                                 "model's folder; keep the data files beside the model")
        data = path.parent / Path(*rel.parts)
        if not data.is_file():
            raise ModelFileError(f"{path}: its external data file {data} is missing; copy it "
                                 "beside the model")
        files.append(data)
    return files


def metadata_props(path) -> dict[str, str]:
    """The model's ``metadata_props`` (key -> value), read without loading the graph: what a
    backend needs to know before it opens a session. Empty for a file that is not ONNX."""
    out: dict[str, str] = {}
    try:
        with _top_fields(path) as (buf, fields):
            for number, s, e in fields:
                if number == _MODEL_METADATA:
                    entry = {k: bytes(buf[a:b]) for k, a, b in _fields(buf, s, e)}
                    out[entry.get(1, b"").decode("utf-8", "replace")] = \
                        entry.get(2, b"").decode("utf-8", "replace")
    except (_Malformed, OSError, ValueError):
        return {}
    return out
