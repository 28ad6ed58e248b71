"""`JobClient.events()` over a connection that breaks: a TCP proxy between the client and the
API cuts the link mid-stream (both sockets closed) while the job trains on. The client must
reconnect by itself with `Last-Event-ID` and yield the job's stream exactly: no gap, no
duplicate, ending with `end`."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from service.client import Event, JobClient
from tests.service.conftest import KEYS, long_config, read_sse, submit, wait_for

pytestmark = pytest.mark.slow

TERMINAL = {"succeeded", "failed", "cancelled"}


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to the API. Records the request head (request line and
    headers) of every connection before forwarding it, and `cut()` closes every open
    connection, both sides, at once."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.heads: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        with self.lock:
            return len(self.heads)

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(down,), daemon=True).start()

    def _serve(self, down: socket.socket) -> None:
        up = socket.create_connection(self.upstream)
        with self.lock:
            self.open += [down, up]
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = down.recv(65536)
            if not chunk:
                self._close(down, up)
                return
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        with self.lock:  # recorded before the API sees the request
            self.heads.append((lines[0], headers))
        up.sendall(head)
        threading.Thread(target=self._pump, args=(up, down), daemon=True).start()
        self._pump(down, up)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        self._close(source, target)

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> None:
        with self.lock:
            socks, self.open = self.open, []
        self._close(*socks)

    def close(self) -> None:
        self.listener.close()
        self.cut()


def stream_id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def test_events_resume_with_last_event_id_after_the_link_is_cut(
    service: str, client: httpx.Client
) -> None:
    url = urlsplit(service)
    proxy = CuttingProxy((url.hostname or "127.0.0.1", url.port or 80))
    job_id = submit(client, long_config(steps=400, checkpoint_every=100))["id"]
    cut_after = 6
    got: list[tuple[Event, int]] = []  # each event, and the connections made when it came
    at_cut: dict[str, Any] = {}
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            with JobClient(proxy.url, api_key=KEYS["alice"]) as jc:
                for event in jc.events(job_id):
                    got.append((event, proxy.connections))
                    if len(got) == cut_after:
                        proxy.cut()
                        at_cut["job"] = client.get(f"/v1/jobs/{job_id}").json()  # direct
                        at_cut["connections"] = proxy.connections
        except BaseException as exc:
            failure.append(exc)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    reader.join(timeout=150)
    proxy.close()
    assert not reader.is_alive(), f"the client did not finish: {len(got)} events"
    assert not failure, failure
    final = wait_for(client, job_id, TERMINAL)
    assert final["state"] == "succeeded", final

    # the job was still training when the link went
    assert at_cut["job"]["state"] == "running", at_cut
    assert at_cut["job"]["progress"]["step"] < 400

    events = [e for e, _ in got]
    assert events[-1].type == "end" and events[-1].data == {"state": "succeeded"}
    ids = [e.id for e in events[:-1]]
    assert all(ids), ids
    assert len(ids) == len(set(ids)), "an event came twice"
    keys = [stream_id(i) for i in ids]
    assert keys == sorted(keys), "ids out of order"

    # exactly the job's stream, read again from the start afterwards
    full, _ = read_sse(client, job_id)
    assert ids == [e["id"] for e in full if "id" in e], "an event is missing"
    assert [(e.type, e.attempt, e.step, e.data) for e in events[:-1]] == [
        (e["event"], e["data"]["attempt"], e["data"]["step"], e["data"]["data"])
        for e in full
        if "id" in e
    ]

    # two connections through the proxy: the first stream and the client's own reconnection,
    # which resumed after the last event it had yielded before the cut
    heads = proxy.heads
    assert [line for line, _ in heads] == [f"GET /v1/jobs/{job_id}/events HTTP/1.1"] * 2
    first, second = (h for _, h in heads)
    assert "last-event-id" not in first
    assert all(h["authorization"] == f"Bearer {KEYS['alice']}" for h in (first, second))
    before_reconnect = [e for e, n in got if n <= at_cut["connections"]]
    after_reconnect = [e for e, n in got if n > at_cut["connections"]]
    assert len(before_reconnect) >= cut_after and after_reconnect, (len(got), at_cut)
    assert second["last-event-id"] == before_reconnect[-1].id
    assert after_reconnect[0].id == ids[ids.index(second["last-event-id"]) + 1]
    assert sum(e.type == "log" for e in after_reconnect) > 3  # it carried on, live
