"""The root's side of a cluster: plan the slices, hand every worker its share, start the data
plane, build the root's own share with a sync that reaches the workers, and keep the cluster
going when workers come and go.

A worker is *lost* when its link drops (killed: at once; frozen or cut off: when heartbeats go
unanswered, ``--heartbeat-timeout``). The root then gives the session up (every survivor leaves
its forward at once), plans the slices again over the nodes left, and starts a new session (a
new *epoch*: anything of the old one is refused). The caller (``engine.session``) replays the
tokens so far to rebuild every KV cache and redoes the forward that failed. A prober thread
retries lost workers with backoff; one that answers idle is *rejoining* and is admitted at the
next forward (``admit``), in the same way.
"""
from __future__ import annotations

import hashlib
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import zmq

from dllama.default_model import dllama_home
from dllama.errors import DllamaError
from dllama.formats.cuts import TensorCut
from dllama.formats.digest import remembered_sha256
from dllama.formats.mfile import ModelFile
from dllama.machine import physical_memory
from dllama.model.forward import Transformer
from dllama.model.node import node_config, warm_up
from dllama.model.node_speed import AUTO, NodeSpeed, measure, plan_by_speed
from dllama.model.slicing import (
    NodeModel,
    NodeSlice,
    describe_plan,
    node_cuts,
    node_kv_bytes,
    node_weight_bytes,
    plan_digest,
    plan_slices,
    whole_bytes,
)
from dllama.model.sync import LOCAL, Sync
from dllama.engine.prober import PROBE_FIRST, PROBE_MAX, Prober
from dllama.transport.keys import worker_specs
from dllama.transport.links import HEARTBEAT_TIMEOUT, PLAINTEXT, LinkSecurity
from dllama.transport.mesh import PeerFailed
from dllama.transport.protocol import PROTOCOL_VERSION, ProtocolError
from dllama.transport.root import RootLink, WorkerFailed, WorkerLink, open_worker
from dllama.transport.sync import RootSync
from dllama.transport.wire import WireCodec
from dllama.transport.zap import DATA, Gatekeeper

# What a generation raises when the cluster broke (a worker died, froze or misbehaved).
CLUSTER_FAILURES = (WorkerFailed, PeerFailed, ProtocolError)
# After a first lost link, how long to wait for the others a failure names.
SETTLE_SECONDS = 0.3
# Probing a lost worker: first after PROBE_FIRST, then twice as long each time (engine.prober).
# A worker lost again within this long of being taken back waits 4x longer for its first probe
# (a worker that fails every session it joins must not cost a recovery every second).
STRIKE_SECONDS = 60.0


class ClusterTooSmall(DllamaError):
    """The nodes left cannot hold the model."""


def model_digest(path) -> str:
    """SHA-256 of a model file (remembered, so that it is read once)."""
    return remembered_sha256(path, dllama_home() / "model-digests.json")


def _progress(total: int) -> Callable[[int], None]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="📤 weights to workers", file=sys.stderr,
               disable=total == 0, leave=False)

    def step(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()
    return step


@dataclass
class WeightTransfer:
    """How a worker got its slices in a session."""

    address: str
    node: int
    source: str  # "local" (its model file), "cache", "cache+root" or "root"
    bytes_sent: int = 0
    seconds: float = 0.0
    from_cache: bool = False  # nothing sent: its model file or slice cache had it all

    def __post_init__(self) -> None:
        self.from_cache = self.source in ("local", "cache")


@dataclass
class Recovery:
    """One change of the cluster: workers lost (or admitted again), and what it cost."""

    kind: str  # "lost" or "rejoined"
    workers: list[str]
    reason: str
    nodes: int  # nodes after it
    noticed_unix: float  # when the root noticed (the failure surfaced, or a rejoiner was due)
    settle_seconds: float = 0.0  # telling who is lost
    plan_seconds: float = 0.0
    load_seconds: float = 0.0  # the new session: greeting, weights, data plane, building
    replay_seconds: float = 0.0  # the KV caches, evaluated again
    replayed_tokens: int = 0

    @property
    def seconds(self) -> float:
        return self.settle_seconds + self.plan_seconds + self.load_seconds + self.replay_seconds


@dataclass
class ClusterStats:
    nodes: int
    forwards: int
    sync_seconds: float  # all-gathers and logits, encoding and summing included
    bytes_sent: int
    bytes_received: int

    def since(self, start: ClusterStats) -> ClusterStats:
        """What happened between ``start`` and these counters."""
        return ClusterStats(self.nodes, self.forwards - start.forwards, self.sync_seconds - start.sync_seconds,
                            self.bytes_sent - start.bytes_sent, self.bytes_received - start.bytes_received)


@dataclass
class Member:
    """A worker the user named, whatever its state."""

    address: str
    weight: float  # relative speed (--split)
    state: str = "up"  # "up", "lost" or "rejoining" (answered a probe: admitted at the next forward)
    link: WorkerLink | None = None
    reason: str = ""  # why it was lost
    probes: int = 0
    next_probe: float = 0.0
    admitted: float = 0.0  # when it was last taken back (monotonic)
    strikes: int = 0  # losses soon after being taken back, in a row
    key: bytes | None = None  # its public key (CURVE links)


class Cluster:
    """The root's share of the model (``transformer``) on the nodes alive, and everything needed
    to plan them again."""

    def __init__(self, model: ModelFile, addresses: list[str], seq_len: int, buffer_type: str, net_timeout: float,
                 build_root: Callable[[NodeModel, Sync], Transformer], log: Callable[[str], None],
                 split: list[float] | str | None = None, heartbeat: float = HEARTBEAT_TIMEOUT,
                 on_worker_loss: str = "continue", n_slots: int = 1, security: LinkSecurity = PLAINTEXT):
        """``addresses``: ``HOST:PORT``, with CURVE ``HOST:PORT@KEY`` (``security``: this root's pair)."""
        specs = worker_specs(addresses, security.public_key is not None)
        addresses = [address for address, _ in specs]
        self.root_speed = measure() if split == AUTO else None  # auto: workers say theirs in hello
        split = [1.0] * (1 + len(addresses)) if split in (None, AUTO) else split
        plan_slices(model.header, split)  # a plan that cannot be is an error before anything connects
        self.model = model
        self.seq_len = seq_len
        self.n_slots = n_slots  # KV cache slots of every node (the API's --parallel)
        self.buffer_type = buffer_type
        self.net_timeout = net_timeout
        self.heartbeat = heartbeat
        self.build_root = build_root
        self.log = log
        self.on_worker_loss = on_worker_loss
        self.root_weight = split[0]
        self.members = [Member(a, w, key=key) for (a, key), w in zip(specs, split[1:])]
        self.security = security
        self.ctx = zmq.Context()
        self.gatekeeper = None if security.public_key is None else \
            Gatekeeper(self.ctx, log, {DATA: "not a worker of this root's session"})
        self.lock = threading.Lock()  # member states: the prober thread moves lost ones to rejoining
        self.epoch = 0
        self.link: RootLink | None = None
        self.sync: RootSync | None = None
        self.transformer: Transformer | None = None
        self.plan: list[NodeSlice] = []
        self.transfers: list[WeightTransfer] = []
        self.recoveries: list[Recovery] = []
        self.broken: str | None = None  # why the cluster can no longer run
        self._totals = ClusterStats(0, 0, 0.0, 0, 0)  # of the sessions before this one
        self._digest = model_digest(model.path)
        self._prober: Prober | None = None
        self._pending: Recovery | None = None  # a change whose replay is still due
        self.plan_seconds = 0.0  # of the latest session

    # -- sessions -----------------------------------------------------------------------------
    @property
    def up(self) -> list[Member]:
        return [m for m in self.members if m.state == "up"]

    def start(self) -> Transformer:
        """The first session, with every worker (any failure is fatal: nothing runs yet)."""
        try:
            return self._start_session(self.members)
        except BaseException:
            self.close()
            raise

    def _start_session(self, members: list[Member]) -> Transformer:
        self._retire_session()
        self.transformer = None  # the old share goes before the new one is built
        self.epoch += 1
        h = self.model.header
        t0 = time.perf_counter()
        plan = plan_slices(h, [self.root_weight] + [m.weight for m in members])
        self.plan_seconds = time.perf_counter() - t0
        if self.epoch == 1 and (self.root_speed is None or not members):
            self._banner(plan, members)  # before anything slow (a change says one line instead)
        if not members:  # the root alone: no sync at all
            self.plan, self.transfers = plan, []
            self.transformer = self.build_root(NodeModel.from_model(self.model, plan[0]), LOCAL)
            self.transformer.prepare()
            return self.transformer
        for m in members:
            if m.link is None:
                m.link = open_worker(self.ctx, m.address, self.heartbeat, self.security, m.key)
                m.link.sock.sndtimeo = int(self.net_timeout * 1000)
        link = RootLink(self.ctx, [m.link for m in members], self.epoch, self.net_timeout, self.heartbeat,
                        self.security, self.gatekeeper)
        self.link = link
        link.hello(len(plan))
        t0 = time.perf_counter()
        if self.root_speed is not None:
            plan = self._plan_by_speed(link.workers)
            if self.epoch == 1:
                self._banner(plan, members)
        self._check_memory(plan, link.workers)
        self.plan_seconds += time.perf_counter() - t0
        transfers, needs = [], []
        for w, node in zip(link.workers, plan[1:]):
            key = hashlib.sha256(f"{PROTOCOL_VERSION}\n{self._digest}\n{plan_digest(h, node)}".encode()).hexdigest()
            reply = link.configure(w, node_config(h, node, self.seq_len, self.buffer_type, key, self._digest,
                                                  self.n_slots))
            need = _needed(reply, node_cuts(h, node), w)
            source = reply.get("source") if reply.get("source") in ("local", "cache", "cache+root") else "root"
            transfers.append(WeightTransfer(w.address, node.index, source))
            needs.append(need)
        total = sum(c.nbytes for need in needs for c in need)
        progress = _progress(total) if self.epoch == 1 else (lambda n: None)  # a recovery says one line
        for w, need, transfer in zip(link.workers, needs, transfers):
            t0 = time.perf_counter()
            if need:
                link.send_pieces(w, (c.region(whole_bytes(self.model.tensors, c.name)) for c in need), progress)
            transfer.seconds = time.perf_counter() - t0
            transfer.bytes_sent = w.weight_bytes_sent
        link.start_mesh()
        link.send_all("build")
        sync = RootSync(link, WireCodec(self.buffer_type == "q80"), [node.vocab_size for node in plan], h.dim)
        transformer = self.build_root(NodeModel.from_model(self.model, plan[0]), sync)  # while the workers build
        transformer.prepare()
        warm_up(transformer)
        link.wait_built()
        link.send_all("go")
        self.sync, self.transformer, self.plan, self.transfers = sync, transformer, plan, transfers
        return transformer

    def _retire_session(self) -> None:
        """Count the current session's traffic into the totals and give it up."""
        if self.link is not None:
            s = self.stats()
            self._totals = ClusterStats(0, s.forwards, s.sync_seconds, s.bytes_sent, s.bytes_received)
            self.link.abandon()
        self.link = self.sync = None

    def _banner(self, plan: list[NodeSlice], members: list[Member]) -> None:
        for line in describe_plan(self.model.header, plan, [m.address for m in members], self.seq_len, self.n_slots):
            self.log(line)

    def _need(self, node: NodeSlice) -> int:
        h = self.model.header
        return node_weight_bytes(h, node) + node_kv_bytes(h, node, self.seq_len, self.n_slots)

    def _plan_by_speed(self, workers: list[WorkerLink]) -> list[NodeSlice]:
        """--split auto: slices by the speeds the root and the workers measured of themselves."""
        speeds = [self.root_speed.stream]
        for w in workers:
            try:
                speeds.append(NodeSpeed.from_json(w.speed).stream)
            except ValueError as e:
                raise WorkerFailed(f"worker {w.address}: {e}", [w.index]) from None
        plan, summary = plan_by_speed(self.model.header, speeds, [physical_memory()] + [w.memory for w in workers],
                                      self._need)
        self.log(summary)
        return plan

    def _check_memory(self, plan: list[NodeSlice], workers: list[WorkerLink]) -> None:
        for node, name, memory in zip(plan, ["the root"] + [f"worker {w.address}" for w in workers],
                                      [physical_memory()] + [w.memory for w in workers]):
            need = self._need(node)
            if need > memory:
                raise ClusterTooSmall(f"the {len(plan)} nodes left cannot hold the model: {name} would need "
                                      f"{need / 2**30:.2f} GiB of its {memory / 2**30:.2f} GiB")

    # -- losing and taking back workers -------------------------------------------------------
    def recover(self, err: BaseException) -> Transformer:
        """After ``err`` broke a forward: drop the workers that are gone, plan the nodes left and
        start a new session on them (the caller replays the tokens). Raises ``err`` when the
        user chose ``--on-worker-loss fail``, ClusterTooSmall when the nodes left cannot hold the model."""
        if self.on_worker_loss != "continue" or self.link is None:
            self.broken = str(err)
            raise err
        record = Recovery("lost", [], "", 0, time.time())
        while True:
            t0 = time.perf_counter()
            lost = self._settle(err) if self.link is not None else []
            if not lost:
                self.broken = str(err)
                raise err  # nobody to blame: not a lost node
            self.link.abandon()
            for m, why in lost:
                self._lose(m, why)
                record.workers.append(m.address)
                record.reason = record.reason or why
            record.settle_seconds += time.perf_counter() - t0
            try:
                return self._restart(record)
            except CLUSTER_FAILURES as e:
                err = e  # another one went while planning: drop it too

    def _restart(self, record: Recovery) -> Transformer:
        t0 = time.perf_counter()
        members = self.up
        try:
            transformer = self._start_session(members)
        except ClusterTooSmall as e:
            self.broken = str(e)
            raise
        record.plan_seconds += self.plan_seconds
        record.load_seconds += time.perf_counter() - t0 - self.plan_seconds
        record.nodes = len(self.plan)
        self._pending = record
        return transformer

    def rejoin_due(self) -> bool:
        return any(m.state == "rejoining" for m in self.members)

    def admit(self) -> Transformer:
        """Take the rejoining workers back (between forwards): a new session with them."""
        with self.lock:
            joining = [m for m in self.members if m.state == "rejoining"]
            for m in joining:
                m.state, m.reason, m.admitted = "up", "", time.monotonic()
        record = Recovery("rejoined", [m.address for m in joining], "answered again", 0, time.time())
        try:
            return self._restart(record)
        except CLUSTER_FAILURES as e:
            return self.recover(e)

    def replayed(self, seconds: float, tokens: int) -> None:
        """The session replayed ``tokens`` after the last change: the change is complete."""
        record, self._pending = self._pending, None
        if record is None:
            return
        record.replay_seconds, record.replayed_tokens = seconds, tokens
        self.recoveries.append(record)
        if record.kind == "lost":
            self.log(f"⚠️  lost worker {', '.join(record.workers)} ({record.reason}): continuing on "
                     f"{record.nodes} node{'s' if record.nodes > 1 else ''}, recovered in {record.seconds:.2f} s "
                     f"(settle {record.settle_seconds:.2f}, load {record.load_seconds:.2f}, replay of "
                     f"{tokens} tokens {seconds:.2f})")
        else:
            self.log(f"✅ worker {', '.join(record.workers)} rejoined: {record.nodes} nodes, in "
                     f"{record.seconds:.2f} s (load {record.load_seconds:.2f}, replay of {tokens} tokens {seconds:.2f})")

    def _settle(self, err: BaseException) -> list[tuple[Member, str]]:
        """The members lost in the failure ``err``: those whose link dropped. Waits a moment for
        the links of the nodes the failure names (a frozen node's links drop within a heartbeat
        of each other); when no link drops, the nodes it names failed in some other way."""
        link = self.link
        by_index = {m.link.index: m for m in self.up if m.link is not None}
        blamed = set(getattr(err, "nodes", []))
        t0 = time.monotonic()
        while True:
            link.drain()
            for w in link.workers:
                blamed.update(w.errors)
            down = {i for i, m in by_index.items() if not m.link.up}
            waited = time.monotonic() - t0
            if down and (blamed <= down or waited > SETTLE_SECONDS):
                return [(by_index[i], self._why(by_index[i])) for i in sorted(down)]
            if not down and waited > self.heartbeat + SETTLE_SECONDS:
                return [(by_index[i], str(err)) for i in sorted(blamed) if i in by_index]
            time.sleep(0.01)

    def _why(self, m: Member) -> str:
        """Why a worker's link dropped, from whether its port still takes connections."""
        try:
            with socket.create_connection((m.link.host, m.link.port), timeout=0.2):
                return "stopped answering heartbeats: frozen, or its network is down"
        except ConnectionRefusedError:
            return "its process is gone"
        except OSError:
            return "unreachable"

    def _lose(self, m: Member, why: str) -> None:
        with self.lock:
            now = time.monotonic()
            m.strikes = m.strikes + 1 if m.admitted and now - m.admitted < STRIKE_SECONDS else 0
            m.state, m.reason, m.probes = "lost", why, 0
            m.next_probe = now + min(PROBE_MAX, PROBE_FIRST * 4 ** m.strikes)
            if m.link is not None:
                m.link.close()
                m.link = None
        if self._prober is None:
            self._prober = Prober(self.members, self.lock, self.heartbeat, self.security)
            self._prober.start()

    # -- what it looks like ---------------------------------------------------------------------
    def stats(self) -> ClusterStats:
        t = self._totals
        if self.sync is None:
            return ClusterStats(len(self.plan), t.forwards, t.sync_seconds, t.bytes_sent, t.bytes_received)
        s = self.sync.stats()
        return ClusterStats(len(self.plan), t.forwards + s.forwards, t.sync_seconds + s.seconds,
                            t.bytes_sent + s.bytes_sent, t.bytes_received + s.bytes_received)

    def alive(self) -> bool:
        """Whether the cluster can still run (``--on-worker-loss fail``: whether every worker is
        still connected; read between generations only)."""
        if self.broken is not None:
            return False
        if self.on_worker_loss == "continue":
            return True
        for m in self.members:
            if m.link is not None:
                m.link.watch()
                if not m.link.up:
                    self.broken = f"worker {m.address} disconnected"
                    return False
        return True

    def health(self) -> dict:
        """The nodes (up, lost, rejoining) and the current split, as ``GET /health`` shows them."""
        def entry(address: str, state: str, node: int | None, reason: str) -> dict:
            out = {"address": address, "state": state}
            if node is not None and node < len(self.plan):
                s = self.plan[node]
                out.update(node=node, slice={"q_heads": list(s.q_heads), "kv_heads": list(s.kv_heads),
                                             "hidden": list(s.hidden), "vocab": list(s.vocab)})
            elif reason:
                out["reason"] = reason
            return out

        with self.lock:
            nodes = [entry("root", "up", 0, "")] + [
                entry(m.address, m.state, m.link.index if m.state == "up" and m.link is not None else None, m.reason)
                for m in self.members]
        return {"nodes_up": len(self.plan), "nodes": nodes, "epoch": self.epoch,
                "recoveries": [asdict(r) for r in self.recoveries]}

    def describe_nodes(self) -> str:
        states = [f"{m.address} {m.state}" for m in self.members]
        return f"💡 Nodes: {len(self.plan)} up (root, {', '.join(states)})"

    def close(self) -> None:
        if self._prober is not None:
            self._prober.stop()
        if self.link is not None:
            self.link.close()
            self.link = None
        for m in self.members:
            if m.link is not None:
                m.link.close()
                m.link = None
        if self.gatekeeper is not None:
            self.gatekeeper.close()
        self.ctx.term()


def _needed(reply: dict, cuts: list[TensorCut], w: WorkerLink) -> list[TensorCut]:
    """The pieces a worker asked for, checked against what its node holds."""
    by_name = {c.name: c for c in cuts}
    need = reply.get("need")
    if not isinstance(need, list):
        raise WorkerFailed(f"worker {w.address}: its configuration reply lists no pieces", [w.index])
    out = []
    for item in need:
        ok = isinstance(item, list) and len(item) == 3 and item[0] in by_name \
            and all(isinstance(v, int) and not isinstance(v, bool) for v in item[1:])
        cut = by_name[item[0]] if ok else None
        if cut is None or not cut.lo <= item[1] < item[2] <= cut.hi:
            raise WorkerFailed(f"worker {w.address} asked for a piece its node does not hold", [w.index])
        out.append(cut._replace(lo=item[1], hi=item[2]))
    return out

