#!/usr/bin/env python3
# Test helper for guard-daemon/tests/run.rs: sends a DNS query to [::1]:53
# from a raw IPv6 socket behind N extension headers (hop-by-hop, then
# destination options). Prints "sent" or "refused ERRNO".
import socket, struct, sys
count, name = int(sys.argv[1]), sys.argv[2]
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
udp = struct.pack(">HHHH", 40000, 53, 8 + len(q), 0) + q
kinds = [0] + [60] * (count - 1) if count else []
chain = b""
for i, kind in enumerate(kinds):
    nxt = kinds[i + 1] if i + 1 < len(kinds) else 17
    chain += bytes([nxt, 0, 1, 4, 0, 0, 0, 0])   # PadN filling the 8 bytes
first = kinds[0] if kinds else 17
ip6 = struct.pack(">IHBB", 6 << 28, len(chain) + len(udp), first, 64) + socket.inet_pton(socket.AF_INET6, "::1") * 2
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
try:
    s.sendto(ip6 + chain + udp, ("::1", 0))
    print("sent")
except OSError as e:
    print("refused", e.errno)
