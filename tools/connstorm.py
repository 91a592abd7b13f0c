#!/usr/bin/env python3
"""Hold N concurrent SSH connections open against a self-hosted proxy and check it hits no descriptor limit.

    python tools/connstorm.py [--connections 2000]

Starts a proxy (local backend) with limits sized for N, opens N TCP connections that each exchange SSH banners and
then sit in login, reads the proxy's view (/connections UnauthenticatedCount, /debug/greenlets, open descriptors,
RSS), closes them all and checks the proxy returns to its baseline. Exit 0 when every connection got the proxy's
banner and no 'Too many open files' or accept error was logged.
"""
import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import harness  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=2000)
    args = ap.parse_args()
    n = args.connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = tempfile.mkdtemp(prefix="connstorm-")
    proxy = harness.Proxy(work, extra={"limits": {"max_connections": n + 100, "max_startups": n + 100},
                                       "timeouts": {"login": 120.0}})
    socks = []
    ok = True
    try:
        proxy.start()
        base = harness.proxy_vitals(proxy)
        started = time.monotonic()
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
            s.sendall(b"SSH-2.0-connstorm\r\n")
            socks.append(s)
        banners = 0
        for s in socks:
            if s.recv(256).startswith(b"SSH-2.0-"):
                banners += 1
        held = time.monotonic() - started
        time.sleep(1.0)
        conns = harness.admin_json(proxy, "/connections")
        greenlets, _, fds = harness.proxy_vitals(proxy)
        with open("/proc/%d/status" % proxy.proc.pid) as f:
            rss_kib = int([ln for ln in f if ln.startswith("VmRSS:")][0].split()[1])
        limit_line = [ln for ln in proxy.read_log().splitlines() if "descriptor limit" in ln]
        print(json.dumps({
            "connections": n, "banners_received": banners, "seconds_to_open_all": round(held, 2),
            "proxy_unauthenticated": conns.get("UnauthenticatedCount"), "proxy_fds": fds,
            "proxy_greenlets": greenlets, "proxy_rss_kib": rss_kib, "baseline": base,
            "descriptor_limit_log": limit_line[0].split("INFO ")[-1] if limit_line else None}, indent=2))
        ok = banners == n and conns.get("UnauthenticatedCount", n) >= n
        for s in socks:
            s.close()
        socks = []
        after = harness.wait_for_baseline(proxy, base, timeout=60)
        print("after close:", after)
        bad = [ln for ln in proxy.read_log().splitlines() if "Too many open files" in ln or "Traceback" in ln]
        if bad:
            print("problems:", *bad[:5], sep="\n")
            ok = False
    finally:
        for s in socks:
            s.close()
        proxy.stop()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
