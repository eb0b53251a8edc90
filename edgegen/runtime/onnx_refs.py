"""The files an ONNX model points to, read straight from its protobuf bytes.

An ONNX tensor may keep its data in another file ("external data"), named by a
path inside the model. The runtime checks those paths before ONNX Runtime opens
anything, without the `onnx` package: this walks the protobuf wire format
through every place a tensor can sit and skips everything else.

    ModelProto.graph / .functions -> GraphProto / FunctionProto
      -> nodes -> attributes -> tensors, sparse tensors, subgraphs
      -> initializers, sparse initializers -> TensorProto.external_data["location"]
"""

from __future__ import annotations

import mmap
from pathlib import Path

from edgegen.errors import BundleError

# field number -> kind of the embedded message, per message kind (onnx.proto)
_CHILDREN = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
_MAX_DEPTH = 64  # nested subgraphs; deeper is a damaged or hostile file


def external_data_locations(path: Path) -> set[str]:
    """Every external-data location named in the model file at `path`."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise BundleError(f"{path.name} is empty")
        locations: set[str] = set()
        damage = None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                _walk(memoryview(data), 0, len(data), "model", locations, 0)
            except (IndexError, ValueError) as e:
                damage = str(e)  # raised below: the traceback must not pin the mapping
    if damage is not None:
        raise BundleError(f"{path.name} is not a readable ONNX model: {damage}")
    return locations


def _walk(data, start: int, end: int, kind: str, out: set[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("messages nested too deeply")
    children = _CHILDREN.get(kind, {})
    entry: dict[int, bytes] = {}
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise ValueError("a field runs past the end of its message")
            if kind == "entry":
                entry[field] = bytes(data[pos : pos + size])
            elif field in children:
                _walk(data, pos, pos + size, children[field], out, depth + 1)
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("a field runs past the end of its message")
    if kind == "entry" and entry.get(1) == b"location":
        out.add(entry.get(2, b"").decode("utf-8", errors="replace"))


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")
