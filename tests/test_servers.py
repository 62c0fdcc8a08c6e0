"""The test servers' own plumbing: the ports they are started on."""

from __future__ import annotations

import socket

from tests import servers
from tests.servers import _ephemeral_low, free_port


def test_free_ports_are_bindable_distinct_and_below_the_ephemeral_range():
    low = _ephemeral_low()
    ports = [free_port() for _ in range(100)]
    assert len(set(ports)) == len(ports), "a port is handed out once per run"
    if low > 1024 + 1000:  # the range leaves room below it (Linux's default: 32768-60999)
        assert all(port < low for port in ports), "no outgoing connection can take a port picked below the range"
    with socket.socket() as sock:  # still free: nothing was left bound
        sock.bind(("127.0.0.1", ports[0]))


def test_a_port_something_listens_on_is_passed_over(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with socket.socket() as probe:  # a second port, free now, to be picked instead
            probe.bind(("127.0.0.1", 0))
            spare = probe.getsockname()[1]

        class Picks:  # the candidates free_port draws: the busy port first
            def sample(self, population, k):
                return [busy, spare]

        monkeypatch.setattr(servers, "_RANDOM", Picks())
        assert free_port() == spare
