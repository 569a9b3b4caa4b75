"""The hub's forwarding and frame authentication, in-process (no UML)."""

import random
import socket
import time

import pytest

from apppot_mpi import hub, mcastnet, rankspawn


def mac(i):
    return bytes([2, 0, 0, 0, 0, i])


def frame(dst, src, payload=b"x" * 50):
    return dst + src + b"\x08\x00" + payload


class FakeNet:
    def __init__(self):
        self.sent = []

    def sendmsg(self, parts, *_):
        self.sent.append(b"".join(bytes(p) for p in parts))


@pytest.fixture
def three_ports():
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
             for _ in range(3)]
    for a, b in pairs:
        a.setblocking(False)  # as Hub.serve makes them
        b.setblocking(False)
    yield [a for a, _ in pairs], [b for _, b in pairs]
    for a, b in pairs:
        a.close()
        b.close()


def drain(sock):
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def test_unicast_goes_to_one_port_broadcast_floods(three_ports):
    ours, theirs = three_ports
    net = FakeNet()
    table = {mac(0): 0, mac(1): 1, mac(2): 2, mac(9): hub.NET}
    h = hub.Hub(ours, table, net=(net, ("239.1.1.1", 5000)), key=b"k" * 32)
    f = frame(mac(2), mac(0))
    h.forward(memoryview(f), 0)
    assert [drain(s) for s in theirs] == [[], [], [f]] and not net.sent
    b = frame(b"\xff" * 6, mac(1))
    h.forward(memoryview(b), 1)
    assert [drain(s) for s in theirs] == [[b], [], [b]]  # not back to 1
    assert len(net.sent) == 1  # and to the other nodes
    r = frame(mac(9), mac(0))
    h.forward(memoryview(r), 0)
    assert [drain(s) for s in theirs] == [[], [], []] and len(net.sent) == 2


def test_frames_between_nodes_need_the_jobs_key(three_ports):
    ours, theirs = three_ports
    key = b"k" * 32
    net_a, net_b = FakeNet(), FakeNet()
    a = hub.Hub(ours[:1], {mac(0): 0, mac(1): hub.NET}, net=(net_a, None),
                key=key, node=0)
    b = hub.Hub(ours[1:2], {mac(0): hub.NET, mac(1): 0}, net=(net_b, None),
                key=key, node=1)
    f = frame(mac(1), mac(0))
    a.forward(memoryview(f), 0)
    (wire,) = net_a.sent
    b.receive_net(memoryview(wire))
    assert drain(theirs[1]) == [f] and b.stats["net_in"] == 1
    a.receive_net(memoryview(wire))  # our own, looped back: ignored
    assert drain(theirs[0]) == []
    forged = bytearray(wire)
    forged[-1] ^= 1  # one bit of the frame changed
    b.receive_net(memoryview(bytes(forged)))
    other_key = hub.Hub([], {}, net=(FakeNet(), None), key=b"j" * 32, node=0)
    other_key.send_net(memoryview(f))
    b.receive_net(memoryview(other_key.net[0].sent[0]))
    assert drain(theirs[1]) == [] and b.stats["forged"] == 2


def test_replay_window_accepts_each_counter_once_within_the_window():
    w, W = hub.ReplayWindow(), hub.WINDOW
    assert not w.accept(0)  # counters start at 1
    assert w.accept(1) and w.accept(3) and w.accept(2)  # reordered: fine
    assert not any(w.accept(n) for n in (1, 2, 3))  # duplicates
    assert w.accept(W + 2)  # counter 3 is now the oldest the window holds
    assert not w.accept(3) and w.accept(4)  # still remembered / new
    assert w.accept(W + 3)  # 3 slid out of the window
    assert not w.accept(3) and not w.accept(2)  # too old
    assert w.accept(5)  # the window's oldest, never seen
    assert w.accept(10 ** 15)  # a jump beyond the window forgets the rest
    assert not w.accept(10 ** 15 - W) and w.accept(10 ** 15 - W + 1)
    t0 = time.process_time()  # an ancient counter is cheap to refuse
    assert not any(w.accept(1) for _ in range(10000))
    assert time.process_time() - t0 < 0.5


def test_replay_window_matches_a_reference_model():
    rng = random.Random(12)  # noqa: S311  (a reproducible test sequence)
    w, seen, top = hub.ReplayWindow(), set(), 0
    for n in range(1, 20000):  # mostly in order, with reordering, replays
        n = max(1, n + rng.choice([0] * 8 + [-1, -5, -200, -1100, 3]))
        want = n not in seen and n > top - hub.WINDOW
        assert w.accept(n) == want, (n, top)
        if want:
            seen.add(n)
            top = max(top, n)


def test_hub_drops_and_counts_replayed_frames(three_ports):
    ours, theirs = three_ports
    key = b"k" * 32
    senders = [hub.Hub([], {mac(2): hub.NET}, net=(FakeNet(), None),
                       key=key, node=k) for k in (0, 1)]
    b = hub.Hub(ours[2:], {mac(0): hub.NET, mac(1): hub.NET, mac(2): 0},
                net=(FakeNet(), None), key=key, node=2)
    frames = [frame(mac(2), mac(k % 2), bytes([k]) * 40) for k in range(6)]
    for k, f in enumerate(frames):  # two senders, three frames each
        senders[k % 2].send_net(memoryview(f))
    wires = [x.net[0].sent for x in senders]
    assert [len(w) for w in wires] == [3, 3]
    for w in (wires[0][2], wires[0][0], wires[1][0], wires[0][1],
              wires[1][2], wires[1][1]):  # reordered: all arrive
        b.receive_net(memoryview(w))
    assert sorted(drain(theirs[2])) == sorted(frames)
    for w in wires[0] + wires[1] + wires[0][:1]:  # captured and replayed
        b.receive_net(memoryview(w))
    assert drain(theirs[2]) == []
    assert b.stats["replayed"] == 7 and b.stats["net_in"] == 6
    assert b.stats["forged"] == 0
    counter = bytearray(wires[0][2])
    counter[12] += 1  # a fresh counter on a captured frame: the tag breaks
    b.receive_net(memoryview(bytes(counter)))
    assert drain(theirs[2]) == [] and b.stats["forged"] == 1


def test_a_slow_port_queues_then_drops(three_ports, monkeypatch):
    ours, theirs = three_ports
    monkeypatch.setattr(hub, "BACKLOG", 3)
    h = hub.Hub(ours, {mac(1): 1})
    f = frame(mac(1), mac(0), b"y" * 8000)
    sent = 0
    while h.stats["dropped"] == 0:
        h.forward(memoryview(f), 0)
        sent += 1
        assert sent < 10000
    assert h.stats["queued"] == 3  # then the backlog was full
    got = len(drain(theirs[1]))
    h.flush(1)
    assert got + len(drain(theirs[1])) == sent - 1


def test_transport_choice_and_uml_args():
    plan = mcastnet.plan_lan(b"k" * 16, 2)
    hubt = mcastnet.HubTransport()
    args = hubt.uml_args(plan, 1)
    assert args == (f"vec0:transport=fd,fd={{fd}},mac={plan.ranks[1].mac},"
                    "mtu=9000",)
    assert hubt.guest_net(plan, 1) == {"device": "vec0", "name": "eth0",
                                       "address": f"{plan.ranks[1].ip}/16"}

    class Kern:
        def __init__(self, *feats):
            self.feats = feats

        def has(self, f):
            return f in self.feats

        def require(self, *fs):
            if not all(f in self.feats for f in fs):
                raise RuntimeError(f"lacks {fs}")

    assert mcastnet.choose_transport("auto", Kern("vector", "mcast")).name \
        == "hub"
    assert mcastnet.choose_transport(None, Kern("mcast")).name == "mcast"
    assert mcastnet.choose_transport("mcast", Kern("vector", "mcast")).name \
        == "mcast"
    with pytest.raises(RuntimeError):
        mcastnet.choose_transport("mcast", Kern("vector"))


def test_hub_config_names_each_macs_node():
    plan = mcastnet.plan_lan(b"k" * 16, 4, ttl=1)
    conf = rankspawn.hub_config(plan, [("a", [0, 1]), ("b", [2, 3])],
                                "s" * 64, True)
    assert [n for _, n in conf["macs"]] == [0, 0, 1, 1]
    assert conf["macs"][2][0] == plan.ranks[2].mac and conf["ttl"] == 1
    assert conf["key"] != rankspawn.hub_config(plan, [("a", [0, 1, 2, 3])],
                                               "t" * 64, False)["key"]
