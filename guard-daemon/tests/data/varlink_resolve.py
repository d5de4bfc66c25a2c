#!/usr/bin/env python3
"""A stand-in for systemd-resolved's varlink service (io.systemd.Resolve),
as nss-resolve talks to it: NUL-terminated JSON messages on a Unix socket.
Answers every ResolveHostname with 192.0.2.99 and 2001:db8::99, so an answer from it is
recognisable, and appends each name asked to LOG.

usage: varlink_resolve.py SOCKET LOG
"""
import json
import os
import socket
import sys
import threading

SOCKET, LOG = sys.argv[1], sys.argv[2]


def serve(conn):
    buffer = b""
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buffer += data
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                request = json.loads(message)
                method = request.get("method", "")
                parameters = request.get("parameters", {})
                if method == "io.systemd.Resolve.ResolveHostname":
                    name = parameters.get("name", "")
                    with open(LOG, "a") as log:
                        log.write(name + "\n")
                    family = parameters.get("family", 0)
                    addresses = []
                    if family in (0, 2):
                        addresses.append({"ifindex": 1, "family": 2, "address": [192, 0, 2, 99]})
                    if family in (0, 10):
                        addresses.append(
                            {"ifindex": 1, "family": 10, "address": [0x20, 1, 0xD, 0xB8] + [0] * 11 + [0x99]}
                        )
                    reply = {
                        "parameters": {
                            "addresses": addresses,
                            "name": name,
                            "flags": 0,
                        }
                    }
                else:
                    reply = {"error": "org.varlink.service.MethodNotFound", "parameters": {"method": method}}
                conn.sendall(json.dumps(reply).encode() + b"\0")


os.makedirs(os.path.dirname(SOCKET), exist_ok=True)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(SOCKET)
server.listen(16)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
