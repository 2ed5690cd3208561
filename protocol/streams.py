"""Streams and their credit (SPEC.md §7): ids, lifecycle, concurrency and flow control.

:class:`StreamTable` is pure bookkeeping for one connection.  It knows which
streams are open in which direction, who opened them, and how many body bytes
each side may still send on each; it raises :class:`FlowControlError` when the
peer breaks a rule and :class:`LocalProtocolError` when we would.  It encodes
nothing and reports nothing: the connection turns its answers into messages and
events.
"""
from __future__ import annotations

from .errors import FlowControlError, LocalProtocolError
from .messages import MAX_CREDIT

__all__ = ["Stream", "StreamTable"]


class Stream:
    """One open stream: its credit both ways and which halves are still open (§7.2)."""

    __slots__ = ("id", "send_credit", "recv_credit", "unacked", "local_open", "remote_open",
                 "head")

    def __init__(self, stream_id: int, send_credit: int, recv_credit: int):
        self.id = stream_id
        self.send_credit = send_credit
        self.recv_credit = recv_credit
        self.unacked = 0              # body bytes consumed and not yet returned in a WINDOW
        self.local_open = True
        self.remote_open = True
        # The RESPONSE of this stream went out (peer's stream) or came in (ours): a
        # response body (DATA) may only follow it, and there is exactly one (§7.2).
        self.head = False


class StreamTable:
    """The open streams of one connection and the numbers that bound them.

    ``window``/``max_streams`` are what we grant the peer; ``peer_window``/
    ``peer_max_streams`` what it grants us, starting at the protocol minimums
    until its hello says more (§4.2, §4.7).
    """

    def __init__(self, *, client: bool, window: int, max_streams: int, peer_window: int,
                 peer_max_streams: int):
        self.by_id: dict[int, Stream] = {}
        self.window = window
        self.max_streams = max_streams
        self.peer_window = peer_window
        self.peer_max_streams = peer_max_streams
        self.peer_open = 0                  # streams the peer opened that are still open
        self.next_id = 1 if client else 2   # clients open odd ids, nodes even (§7.1)
        self.last_peer_id = 0
        self._peer_even = client

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.by_id)

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self.by_id

    def get(self, stream_id: int) -> Stream | None:
        return self.by_id.get(stream_id)

    def is_peers(self, stream_id: int) -> bool:
        """The peer opened (or would open) ``stream_id``: its parity is the peer's."""
        return (stream_id % 2 == 0) == self._peer_even

    @property
    def slots(self) -> int:
        """Streams we may still open before reaching the peer's ``max_streams``."""
        return max(0, self.peer_max_streams - (len(self.by_id) - self.peer_open))

    def send_credit(self, stream_id: int) -> int:
        s = self.by_id.get(stream_id)
        return s.send_credit if s is not None and s.local_open else 0

    def learn_peer(self, window: int, max_streams: int) -> None:
        """The peer's hello: streams opened before it gain the difference in credit (§4.2)."""
        for s in self.by_id.values():
            s.send_credit += window - self.peer_window
        self.peer_window = window
        self.peer_max_streams = max_streams

    # ------------------------------------------------------------------ ending streams

    def drop(self, stream_id: int) -> bool:
        """Forget a stream (RESET either way, or both halves ended); True if it was open."""
        if self.by_id.pop(stream_id, None) is None:
            return False
        if self.is_peers(stream_id):
            self.peer_open -= 1
        return True

    def clear(self) -> None:
        self.by_id.clear()
        self.peer_open = 0

    def _finish_remote(self, s: Stream) -> None:
        s.remote_open = False
        if not s.local_open:
            self.drop(s.id)

    # ------------------------------------------------------------------ the peer's messages

    def open_remote(self, stream_id: int, body: int, end: bool, *, refuse: bool) -> Stream | None:
        """A REQUEST opening ``stream_id`` with ``body`` bytes; None when it is refused.

        ``refuse`` (we sent GOAWAY) or the peer being at our ``max_streams`` refuses
        the stream: the caller answers with a RESET 503 and the id still counts as
        used, so the peer cannot reuse it.
        """
        if not self.is_peers(stream_id) or stream_id <= self.last_peer_id or stream_id == 0:
            raise FlowControlError(f"stream id {stream_id} is not a new stream of the peer")
        self.last_peer_id = stream_id
        if body > self.window:
            raise FlowControlError("request body larger than the initial window")
        if refuse or self.peer_open >= self.max_streams:
            return None
        s = Stream(stream_id, self.peer_window, self.window - body)
        if end:
            s.remote_open = False
        self.by_id[stream_id] = s
        self.peer_open += 1
        return s

    def _for_body(self, stream_id: int, size: int) -> Stream | None:
        """Charge ``size`` body bytes from the peer to ``stream_id``; None: drop them."""
        s = self.by_id.get(stream_id)
        if s is None:
            known = stream_id <= self.last_peer_id if self.is_peers(stream_id) \
                else stream_id < self.next_id
            if not known:
                raise FlowControlError(f"body on stream {stream_id} that was never opened")
            return None  # a stream we already closed or reset: late bytes are dropped
        if not s.remote_open:
            raise FlowControlError(f"body on stream {stream_id} after its end")
        if size > s.recv_credit:
            raise FlowControlError(
                f"peer sent {size} bytes on stream {stream_id} with {s.recv_credit} of credit")
        s.recv_credit -= size
        return s

    def response(self, stream_id: int, size: int, end: bool) -> bool:
        """A RESPONSE with ``size`` body bytes; True if it is to be reported."""
        s = self._for_body(stream_id, size)
        if self.is_peers(stream_id):
            raise FlowControlError("response on a stream the peer opened")
        if s is None:
            return False
        if s.head:
            raise FlowControlError(f"second response on stream {stream_id}")
        s.head = True
        if end:
            self._finish_remote(s)
        return True

    def data(self, stream_id: int, size: int, end: bool) -> bool:
        """A DATA with ``size`` body bytes; True if it is to be reported."""
        s = self._for_body(stream_id, size)
        if s is None:
            return False
        if not s.head and not self.is_peers(stream_id):
            raise FlowControlError(f"response body before the response on stream {s.id}")
        if end:
            self._finish_remote(s)
        return True

    def window_update(self, stream_id: int, credit: int) -> bool:
        """A WINDOW; True if the stream is still open (it is then reported)."""
        s = self.by_id.get(stream_id)
        if s is None:
            return False
        if s.send_credit + credit > MAX_CREDIT:
            raise FlowControlError("window credit overflow")
        s.send_credit += credit
        return True

    # ------------------------------------------------------------------ our side

    def open_local(self, body: int, end: bool) -> int:
        """Open our next stream with a REQUEST of ``body`` bytes; its id.

        The caller has checked :attr:`slots` and the body against
        :attr:`peer_window`, and encoded the REQUEST under :attr:`next_id`.
        """
        sid = self.next_id
        self.next_id += 2
        s = Stream(sid, self.peer_window - body, self.window)
        s.local_open = not end
        self.by_id[sid] = s
        return sid

    def consume(self, stream_id: int, size: int, end: bool, max_chunk: int) -> Stream:
        """Spend ``size`` bytes of our credit on ``stream_id`` (RESPONSE or DATA we send)."""
        s = self.by_id.get(stream_id)
        if s is None or not s.local_open:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        if size > s.send_credit:
            raise LocalProtocolError(
                f"{size} bytes exceed the {s.send_credit} bytes of credit on stream {stream_id}")
        if size > max_chunk:
            raise LocalProtocolError(f"chunk of {size} bytes exceeds {max_chunk}")
        s.send_credit -= size
        if end:
            s.local_open = False
            if not s.remote_open:
                self.drop(stream_id)
        return s

    def acknowledge(self, stream_id: int, size: int, force: bool) -> int:
        """The application consumed ``size`` bytes: credit to return now (0: not yet).

        Credit goes back in batches of a quarter of the window (or at once with
        ``force``), so a stream costs one WINDOW per quarter window, not per read.
        """
        s = self.by_id.get(stream_id)
        if s is None or not s.remote_open:
            return 0
        s.unacked += size
        if s.unacked >= self.window // 4 or (force and s.unacked):
            credit, s.unacked = s.unacked, 0
            s.recv_credit += credit
            return credit
        return 0
