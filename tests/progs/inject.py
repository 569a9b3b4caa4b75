"""An attacker on the host: inject crafted Ethernet frames into a job's
multicast group and try to make rank 1's agent run a command.

It finds the group/port from /proc/net/udp (UML binds group:port), learns
rank 1's MAC with ARP, completes a TCP handshake to the agent port with
hand-made frames, reads the agent's nonce and sends a request with a guessed
MAC.  Prints a JSON summary of what happened.
"""

import json
import os
import random
import socket
import struct
import sys
import time

ME_MAC = bytes.fromhex("026666666666")
ME_IP = socket.inet_aton("10.253.0.200")
TARGET_IP = socket.inet_aton("10.253.0.2")  # rank 1
AGENT_PORT = 7711


def job_group():
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            local = line.split()[1]
            ip_hex, port_hex = local.split(":")
            ip = socket.inet_ntoa(struct.pack("<I", int(ip_hex, 16)))
            if ip.startswith("239."):
                return ip, int(port_hex, 16)
    raise SystemExit("no job group found")


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_packet(proto, payload):
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64,
                       proto, 0, ME_IP, TARGET_IP)
    return head[:10] + struct.pack("!H", csum(head)) + head[12:] + payload


def tcp(sport, seq, ack, flags, data=b""):
    head = struct.pack("!HHIIBBHHH", sport, AGENT_PORT, seq, ack, 5 << 4, flags,
                       65535, 0, 0)
    pseudo = ME_IP + TARGET_IP + struct.pack("!BBH", 0, 6, len(head) + len(data))
    c = csum(pseudo + head + data)
    return ip_packet(6, head[:16] + struct.pack("!H", c) + head[18:] + data)


def main():
    group, port = job_group()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((group, port))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                 socket.inet_aton(group) + bytes(4))  # any interface
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
    s.settimeout(0.2)
    dest = (group, port)
    seen = {"group": group, "port": port}

    def frames(timeout):
        end = time.time() + timeout
        while time.time() < end:
            try:
                yield s.recv(2000)
            except TimeoutError:
                continue

    # 1. ARP: who has rank 1's address?
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, ME_MAC, ME_IP,
                      b"\0" * 6, TARGET_IP)
    s.sendto(b"\xff" * 6 + ME_MAC + b"\x08\x06" + arp, dest)
    target_mac = None
    for f in frames(5):
        if f[12:14] == b"\x08\x06" and f[28:32] == TARGET_IP and f[20:22] == \
                b"\x00\x02":
            target_mac = f[22:28]
            break
    seen["arp_reply"] = target_mac is not None
    if not target_mac:
        print(json.dumps(seen))
        return
    eth = target_mac + ME_MAC + b"\x08\x00"

    def incoming():
        for f in frames(5):
            if f[:6] == ME_MAC and f[12:14] == b"\x08\x00" and f[23] == 6:
                ihl = (f[14] & 0x0F) * 4
                t = f[14 + ihl:]
                sp, dp, sq, ak, off, flags = struct.unpack("!HHIIBB", t[:14])
                yield sq, ak, flags, t[(off >> 4) * 4:]

    # 2. TCP handshake to the agent, all by hand
    sport, seq = random.randint(30000, 60000), random.randint(0, 1 << 30)  # noqa: S311
    s.sendto(eth + tcp(sport, seq, 0, 0x02), dest)  # SYN
    synack = next((x for x in incoming() if x[2] & 0x12 == 0x12), None)
    seen["syn_ack"] = synack is not None
    if not synack:
        print(json.dumps(seen))
        return
    rseq = synack[0] + 1
    seq += 1
    s.sendto(eth + tcp(sport, seq, rseq, 0x10), dest)  # ACK
    nonce = b""
    for sq, _, _, data in incoming():
        if data and sq == rseq:
            nonce += data
            rseq += len(data)
            if len(nonce) >= 32:
                break
    seen["nonce_bytes"] = len(nonce)
    # 3. a request with a guessed MAC (no secret)
    payload = json.dumps({"cmd": f"touch {sys.argv[1]}/pwned"}).encode()
    req = os.urandom(32) + struct.pack("!I", len(payload)) + payload
    s.sendto(eth + tcp(sport, seq, rseq, 0x18, req), dest)  # PSH|ACK
    answer, fin = b"", False
    for _sq, _, flags, data in incoming():
        answer += data
        if flags & 0x01 or flags & 0x04:  # FIN or RST: the agent hung up
            fin = True
            break
    seen["answer_bytes"] = len(answer)
    seen["closed_by_agent"] = fin
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
