"""A real AdminServer in its own monkey-patched process, for admin tests that need a listening socket.

    python tests/admin_fixture_server.py [--token T] [--interval 0.2] [--window 900] [--greenlets N]
                                         [--max-blocking-time S] [--block-hub S]

Why a subprocess: the admin server runs on gevent's hub, but urllib and selenium block their thread. Serving from the
pytest process would need the test process monkey-patched (which other tests must not inherit) or a second hub in a
thread; a separate, fully patched process is what production runs and keeps pytest untouched.

The process holds a real session Registry with two sessions ("initech" running a clone whose byte counters grow, and
"umbrella"); a session's closer prints "CLOSED <key> <reason>" on stdout and removes it, standing in for the SSH
handler ending. Prints "READY <port>" once listening. Stops when stdin closes (the test ends or dies) or on SIGTERM.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.os  # noqa: E402

from kiln import admin, config, log as kiln_log, metrics, sessions  # noqa: E402
from kiln.keystore import Identity  # noqa: E402


class FakeServer:
    """What AdminApi reads from ProxyServer."""

    def __init__(self, metrics_):
        self.draining = False
        self.started = time.time() - 3725       # "1h2m5s" of uptime, so /info shows hours
        self.metrics = metrics_


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def add_session(registry, key, identity, command, repo):
    session = registry.add(sessions.Session(key, ("192.0.2.7", 50123)))
    registry.authenticate(session, identity)
    session.command, session.repo, session.state = command, repo, "running"

    def closer():
        registry.remove(session)
        say("CLOSED %s %s" % (session.key, session.close_reason))
    session.set_closer(closer)
    return session


def grow(session):
    while True:
        session.bytes_out += 400_000
        session.bytes_in += 3_000
        gevent.sleep(0.1)


def wait_for_stdin_eof(stop):
    fd = sys.stdin.fileno()
    gevent.os.make_nonblocking(fd)
    try:
        while gevent.os.nb_read(fd, 4096):
            pass
    except OSError:
        pass
    stop.set()


def block_hub(seconds):
    gevent.sleep(0.5)
    end = time.monotonic() + seconds
    while time.monotonic() < end:       # deliberately never yields: the monitor thread must notice
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--token", default="")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--window", type=float, default=900.0, help="seconds of samples kept (and charted)")
    p.add_argument("--greenlets", type=int, default=0, help="park this many extra greenlets")
    p.add_argument("--max-blocking-time", type=float, default=0.0)
    p.add_argument("--block-hub", type=float, default=0.0, help="block the hub this long, once, after start")
    args = p.parse_args()

    kiln_log.setup(logging.INFO)
    cfg = config.build({"admin": {"listen": "127.0.0.1:0", "token": args.token,
                                  "max_blocking_time": args.max_blocking_time}}, os.getcwd())
    registry = sessions.Registry()
    m = metrics.Metrics()
    m.connection_opened()
    m.connection_opened()
    m.session_established(0.12)
    m.session_established(0.3)
    clone = add_session(registry, "c10e0001", Identity("SHA256:aaaa", "initech", "Peter Gibbons", "Laptop"),
                        "git-upload-pack 'initech/project.git'", "initech/project.git")
    add_session(registry, "c10e0002", Identity("SHA256:bbbb", "umbrella", "Albert Wesker", "Build Server"),
                "hg -R umbrella/labs serve --stdio", "umbrella/labs")
    parked = gevent.event.Event()
    extra = [gevent.spawn(parked.wait) for _ in range(args.greenlets)]

    server = admin.AdminServer(cfg, FakeServer(m), registry, "0.1.42-abcdef0123-20260101.120000",
                               sample_interval=args.interval, sample_window=args.window)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    helpers = [gevent.spawn(grow, clone), gevent.spawn(wait_for_stdin_eof, stop)]
    server.start()
    if args.block_hub > 0:
        helpers.append(gevent.spawn(block_hub, args.block_hub))
    say("READY %d" % server.address[1])
    try:
        stop.wait()
    finally:
        server.stop()
        gevent.killall(helpers)
        parked.set()
        gevent.joinall(extra, timeout=2)
    say("STOPPED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
