"""The hub's forwarding and frame authentication, in-process (no UML)."""

import socket

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
