"""The LAN hub's own CPU per frame, in process (no appliances).

    python -m benchmarks.hubcost [--frames N]

Drives ``apppot_mpi.hub.Hub`` the way its event loop does, with real
sockets: local forwarding (appliance to appliance on one node: datagram
socket pairs), a frame to the other nodes (tag + ``sendmsg`` on a UDP
socket), and a frame from them (tag check, replay window, delivery to a
local port).  Prints CPU microseconds per frame for 64-byte and 9000-byte
frames (median of 5 rounds) and the CPU model.  The socket pairs are
drained outside the timed region.
"""

import argparse
import platform
import socket
import statistics
import subprocess
import sys
import time

from apppot_mpi import hub

MAC_A, MAC_B, MAC_C = (bytes([2, 0, 0, 0, 0, i]) for i in range(3))
BATCH = 8  # frames per timed batch (net.unix.max_dgram_qlen is 10)


def _pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
    return a, b


def _drain(sock):
    try:
        while True:
            sock.recv(65536)
    except BlockingIOError:
        pass


def _timed(calls, drain, n):
    """CPU seconds per call of ``calls(i)`` over n calls, batch by batch."""
    spent = 0.0
    for start in range(0, n, BATCH):
        t0 = time.process_time()
        for i in range(start, min(n, start + BATCH)):
            calls(i)
        spent += time.process_time() - t0
        drain()
    return spent / n


def measure(size, n):
    key = b"k" * 32
    ours, theirs = zip(*(_pair() for _ in range(2)), strict=True)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    net = (tx, rx.getsockname())
    # node 0: appliances A (port 0) and B (port 1); C lives on node 1
    a = hub.Hub(list(ours), {MAC_A: 0, MAC_B: 1, MAC_C: hub.NET}, net=net,
                key=key, node=0)
    to_b = memoryview(MAC_B + MAC_A + b"\x08\x00" + b"x" * (size - 14))
    to_c = memoryview(MAC_C + MAC_A + b"\x08\x00" + b"x" * (size - 14))
    local = _timed(lambda i: a.forward(to_b, 0), lambda: _drain(theirs[1]), n)
    wire = []

    def capture():
        try:
            while True:
                wire.append(rx.recv(65536))
        except BlockingIOError:
            pass
    out = _timed(lambda i: a.forward(to_c, 0), capture, n)
    # node 1 receives what node 0 sent (those the loopback kept)
    b = hub.Hub([ours[0]], {MAC_A: hub.NET, MAC_B: hub.NET, MAC_C: 0},
                net=(tx, rx.getsockname()), key=key, node=1)
    views = [memoryview(w) for w in wire]
    got = _timed(lambda i: b.receive_net(views[i]), lambda: _drain(theirs[0]),
                 len(views))
    if b.stats["net_in"] != len(views):  # every frame must have counted
        raise SystemExit(f"hubcost: frames refused: {b.stats}")
    for s in (*ours, *theirs, rx, tx):
        s.close()
    return {"local": local, "to_net": out, "from_net": got}


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True,
                             check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hubcost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20000)
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model()}; Python {platform.python_version()}")
    print("| frame | local | to other nodes | from other nodes |")
    print("|---|---|---|---|")
    for size in (64, 9000):
        rounds = [measure(size, args.frames) for _ in range(5)]
        med = {k: statistics.median(r[k] for r in rounds) * 1e6
               for k in rounds[0]}
        print(f"| {size} B | {med['local']:.2f} µs | {med['to_net']:.2f} µs "
              f"| {med['from_net']:.2f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
