"""The messages between root and workers, each format defined once.

Control plane (ROUTER on the worker, one DEALER per worker on the root): multipart messages
``[kind, meta, blob...]``: ``kind`` one of ``KINDS``, ``meta`` a JSON object, then raw byte
frames (a weight piece, logits). Every message of a session carries the session's ``epoch``
(the root counts them up: a new one each time it plans the cluster again); a message of any
other epoch is stale and dropped, so a worker that froze and resumed cannot disturb a cluster
that went on without it. A session goes:

    root                                      worker
    hello {version, epoch, index, n_nodes,
           root_port, heartbeat}         ->   (a hello ends the worker's current session)
                                         <-   hello {version, epoch, data_port, memory} | error
    config {node config, model digest}   ->
                                         <-   config {source, need: [[tensor, lo, hi], ...]}
    chunk {piece, offset} + bytes        ->   (the needed pieces only; each chunk acknowledged)
                                         <-   ack {seq}
    mesh {peers}                         ->   (data plane: every node subscribes to every other)
                                         <-   mesh_ready {}
    build {}                             ->
                                         <-   built {weight_bytes, kv_bytes}
    go {}                                ->
    forward {fwd, slots, positions,      ->   (then the all-gathers on the data plane)
             logits, copies, draws}           (``model.batch.Batch``: rows of several sequences)
                                         <-   logits {fwd} + each logit row: its float32 slice,
                                              or a summary for a draw (``kernels.nucleus``)
    rows {fwd, rows} (rarely)            ->   (whole rows of the last forward: a second round)
                                         <-   logits {fwd, rows} + their float32 slices
    stop {}                              ->
                                         <-   bye {}
    ping {} (anyone, any time)           ->
                                         <-   pong {idle}: whether it could start a session now

Data plane (PUB/SUB): one frame per part: ``DATA_HEADER`` then the payload. ``fwd`` counts the
forwards of a session; ``step`` 0 is the root's embedded input, step ``data_step(layer, block)``
the partial output of a block, ``ABORT_STEP`` (from the root) abandons the session's forward.
``HELLO_FWD`` marks the handshake that proves every subscription is live before the first forward.
"""
from __future__ import annotations

import json
import struct

from dllama.errors import DllamaError

PROTOCOL_VERSION = 4
KINDS = frozenset({"hello", "error", "config", "chunk", "ack", "build", "built", "mesh", "mesh_ready", "go",
                   "forward", "logits", "rows", "stop", "bye", "ping", "pong"})
# A weight chunk; a control message may not exceed CHUNK_BYTES plus room for its meta.
CHUNK_BYTES = 8 << 20
MAX_MESSAGE_BYTES = CHUNK_BYTES + (1 << 20)
MAX_META_BYTES = 1 << 20
MAX_FRAMES = 3  # kind, meta, at most one blob

DATA_MAGIC = b"DLD1"
DATA_HEADER = struct.Struct("<4sIIHH")  # magic, epoch, fwd, step, node
HELLO_FWD = 0xFFFFFFFF
INPUT_STEP = 0  # the root's embedded input
ABORT_STEP = 0xFFFF  # the root gave up the forward: every node leaves it


class ProtocolError(DllamaError):
    """A message that does not follow the protocol."""


def pack(kind: str, meta: dict | None = None, *blobs: bytes | memoryview) -> list:
    assert kind in KINDS, kind
    return [kind.encode(), json.dumps(meta or {}).encode(), *blobs]


def unpack(frames: list) -> tuple[str, dict, list]:
    """(kind, meta, blobs) of a control message; ProtocolError when it is malformed."""
    if not 2 <= len(frames) <= MAX_FRAMES:
        raise ProtocolError(f"a message has 2 to {MAX_FRAMES} frames, got {len(frames)}")
    kind = bytes(frames[0]).decode("ascii", "replace")
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind[:32]!r}")
    if len(frames[1]) > MAX_META_BYTES:
        raise ProtocolError("message metadata too large")
    try:
        meta = json.loads(bytes(frames[1]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError(f"{kind}: metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"{kind}: metadata is not a JSON object")
    return kind, meta, list(frames[2:])


MAX_EPOCH = (1 << 32) - 1


def field(meta: dict, name: str, kind: type, minimum: int | None = None):
    """A typed field of a message's metadata, or ProtocolError."""
    value = meta.get(name)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"field {name!r} missing or not {kind.__name__}")
    if minimum is not None and value < minimum:
        raise ProtocolError(f"field {name!r} is {value}, below {minimum}")
    return value


def data_step(layer: int, block: int) -> int:
    """The data-plane step of a block's partial outputs: ``block`` 0 is a layer's attention,
    1 its feed-forward (``model.sync.ATTENTION``, ``FEED_FORWARD``)."""
    if block not in (0, 1) or layer < 0:
        raise ValueError(f"no data step for layer {layer}, block {block}")
    return 1 + 2 * layer + block


def data_frame(epoch: int, fwd: int, step: int, node: int, payload: bytes) -> bytes:
    return DATA_HEADER.pack(DATA_MAGIC, epoch, fwd, step, node) + payload


def parse_data(frame: bytes) -> tuple[int, int, int, int, memoryview]:
    """(epoch, fwd, step, node, payload) of a data frame."""
    if len(frame) < DATA_HEADER.size:
        raise ProtocolError("data frame too short")
    magic, epoch, fwd, step, node = DATA_HEADER.unpack_from(frame)
    if magic != DATA_MAGIC:
        raise ProtocolError("data frame with a wrong magic")
    return epoch, fwd, step, node, memoryview(frame)[DATA_HEADER.size:]
