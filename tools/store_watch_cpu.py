"""CPU cost of the key store watcher while nothing changes (issue 15: target < 0.5 % of a core).

    python tools/store_watch_cpu.py [--seconds 60] [--keys 1000] [--rounds 2]

Two measurements:
1. a real idle `kilnproxy.py serve` (as operators run it: no -X dev, local backend, `--keys` keys stored), its
   user+system CPU over `--seconds` from psutil, with the watcher and with the watcher turned off (a wrapper that
   makes start_watching a no-op), alternated `--rounds` times;
2. one poll in a monkey-patched process (PRAGMA data_version through gevent's threadpool), timed over many calls.

Every process started here is stopped by its PID. Exit 0 with the figures on stdout.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# kilnproxy.py with the watcher off: run in its place as `python nowatch.py serve --config F`
NO_WATCH = """
import runpy, sys
from gevent import monkey
monkey.patch_all()
sys.path.insert(0, %r)
from kiln import keystore
keystore.KeyStore.start_watching = lambda self: None
sys.argv[0] = %r
runpy.run_path(sys.argv[0], run_name="__main__")
"""

POLL = """
from gevent import monkey
monkey.patch_all()
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from kiln.keystore import SQLiteKeyStore
store = SQLiteKeyStore(sys.argv[2])
store.poll_once()
n = int(sys.argv[3])
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(n):
    store.poll_once()
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
store.close()
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({"polls": n, "cpu_us_per_poll": cpu / n * 1e6, "wall_us_per_poll": (t1 - t0) / n * 1e6}))
"""


def fill_store(proxy, count):
    """count ed25519 keys in the proxy's store, written directly (the CLI would take a process per key)."""
    sys.path.insert(0, os.path.join(ROOT, "lib"))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from kiln.keystore import SQLiteKeyStore
    store = SQLiteKeyStore(os.path.join(proxy.state_dir, "keys.db"))
    for i in range(count):
        text = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        store.add("acct%d" % (i % 50), "User %d" % i, "k%d" % i, text)
    store.close()


def idle_cpu(proxy, seconds):
    import psutil
    p = psutil.Process(proxy.proc.pid)
    time.sleep(3)                       # start-up settles (host keys, first index)
    a = p.cpu_times()
    time.sleep(seconds)
    b = p.cpu_times()
    return (b.user - a.user) + (b.system - a.system)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--polls", type=int, default=20000)
    args = ap.parse_args(argv)
    import harness
    results = {"with watcher": [], "without watcher": []}
    with tempfile.TemporaryDirectory(prefix="watchcpu-") as tmp:
        proxy = harness.Proxy(os.path.join(tmp, "proxy"), dev_mode=False)
        fill_store(proxy, args.keys)
        wrapper = os.path.join(tmp, "nowatch.py")
        with open(wrapper, "w") as f:
            f.write(NO_WATCH % (os.path.join(ROOT, "lib"), harness.KILNPROXY))
        for _ in range(args.rounds):
            for label in ("with watcher", "without watcher"):
                proxy.script = wrapper if label == "without watcher" else harness.KILNPROXY
                loaded = proxy.read_log().count("key store loaded") if os.path.exists(proxy.log_path) else 0
                proxy.start()
                try:
                    cpu = idle_cpu(proxy, args.seconds)
                finally:
                    proxy.stop()
                watched = proxy.read_log().count("key store loaded") - loaded
                assert watched == (1 if label == "with watcher" else 0), (label, watched)
                results[label].append(cpu)
        out = subprocess.run([sys.executable, "-c", POLL, os.path.join(ROOT, "lib"),
                              os.path.join(proxy.state_dir, "keys.db"), str(args.polls)],
                             capture_output=True, text=True, timeout=600, check=True)
        poll = json.loads(out.stdout)
    report = {label: {"cpu_s": [round(c, 3) for c in cpus],
                      "percent_of_a_core": [round(100 * c / args.seconds, 3) for c in cpus]}
              for label, cpus in results.items()}
    report["poll"] = {k: round(v, 1) if isinstance(v, float) else v for k, v in poll.items()}
    report["poll"]["percent_of_a_core_at_2_per_s"] = round(poll["cpu_us_per_poll"] * 2 / 1e4, 4)
    report["seconds"], report["keys"] = args.seconds, args.keys
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
