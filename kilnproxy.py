"""KilnProxy: the one file an operator runs. It patches first, then only wires objects together.

    python kilnproxy.py [serve] [--config FILE]
    python kilnproxy.py keys add|list|remove ...
    python kilnproxy.py version
"""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402  (everything else is imported after patching, on purpose)
import signal  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from kiln import cli, log as kiln_log  # noqa: E402
from kiln.errors import ConfigError, KeyStoreError  # noqa: E402


def serve(args):
    import logging

    from kiln import memory
    memory.use_system_allocator()      # re-executes once with PYTHONMALLOC=malloc (see memory.py), unless set

    from kiln import activation, admin, backends, config, hostkeys, limits, notify, sessions, version
    from kiln import metrics as kiln_metrics
    from kiln import keystore
    from kiln.server import ProxyServer

    cfg = config.load(cli.default_config_path(args))
    inherited = activation.inherited()      # systemd socket activation; bad LISTEN_* -> ConfigError (exit 2)
    kiln_log.setup(fmt=cfg.log.format)
    log = logging.getLogger("kiln.main")
    from kiln import sshcompat
    sshcompat.configure(log)
    notifier = notify.Notifier.from_environ()
    notifier.status("starting")
    limits.raise_nofile(log)
    hostkeys.ensure_private_dir(cfg.state_dir)   # 0700 when created; an existing folder is left as it is
    host_keys = hostkeys.load(cfg.proxy.host_keys, cfg.proxy.generate_host_keys)
    registry = sessions.Registry()
    trimmer = memory.Trimmer(live=lambda: len(registry))     # backends report drained pools to it
    backends_by_name = backends.create_all(cfg, on_drained=trimmer.backend_drained)
    store = keystore.create(cfg)
    proxy_metrics = kiln_metrics.Metrics(backends=list(backends_by_name))
    proxy_metrics.watch_keystore(store)
    server = ProxyServer(cfg, store, backends_by_name, registry, host_keys, metrics=proxy_metrics, trimmer=trimmer)
    admin_server = admin.AdminServer(cfg, server, registry, version.current())
    _log_inherited(inherited, cfg, log)
    try:
        server.start(inherited.ssh if inherited else None)

        def use_index(index):           # the store's watcher saw a change: new connections use the new index
            server.key_index = index

        store.watch(use_index)
        store.start_watching()
        admin_server.start(inherited.admin if inherited else None)
        log.info("KilnProxy %s started (pid %d)", version.current(), os.getpid())
        stopping = gevent.event.Event()

        def describe():
            n = len(registry)
            return "%s %d session%s" % ("draining" if stopping.is_set() else "serving", n, "" if n == 1 else "s")

        signals = []

        def on_stop(signum):
            if stopping.is_set():
                log.warning("second signal %s: exiting now", signal.Signals(signum).name)
                os._exit(1)
            log.info("signal %s: draining", signal.Signals(signum).name)
            stopping.set()

        def on_hup():
            gevent.spawn(_reload, server, log, notifier, describe)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signals.append(gevent.signal_handler(signum, on_stop, signum))
        signals.append(gevent.signal_handler(signal.SIGHUP, on_hup))
        # both listeners accept, and SIGHUP/SIGTERM are handled: a `systemctl reload` right away must not kill us
        notifier.ready(describe())
        notifier.start(describe)
        stopping.wait()
        notifier.stopping(describe())
        server.drain(cfg.timeouts.drain)
        for handler in signals:
            handler.cancel()
    finally:
        admin_server.stop()
        server.stop_accepting()
        if inherited is not None:
            inherited.close()
        notifier.stop()
        notifier.close()
        for backend in backends_by_name.values():
            backend.close()
        store.close()
    log.info("stopped")
    return 0


def _reload(server, log, notifier, describe):
    notifier.reloading()
    problems = server.reload()
    for line in problems:
        log.error("%s", line)
    notifier.ready("%s; last reload failed: %s" % (describe(), "; ".join(problems)) if problems else describe())


def _log_inherited(inherited, cfg, log):
    if inherited is None:
        return
    for sock, what, setting, address in ((inherited.ssh, "SSH", "proxy.listen", cfg.proxy.listen),
                                         (inherited.admin, "admin API", "admin.listen", cfg.admin.listen)):
        if sock is not None:
            log.info("socket activation: %s on inherited descriptor %d%s; %s %s:%d ignored", what, sock.fileno(),
                     " (%s)" % inherited.name_of(sock) if inherited.name_of(sock) else "", setting, *address)
    for fd, name in inherited.unused:
        log.warning("socket activation: inherited descriptor %d%s is neither ssh nor admin: closed", fd,
                    " (%s)" % name if name else "")


def main(argv):
    try:
        args = cli.parse_args(argv)
        if args.command == "serve":
            return serve(args)
        if args.command == "keys":
            return cli.run_keys(args)
        if args.command == "accounts":
            return cli.run_accounts(args)
        return cli.run_version(args)
    except (ConfigError, KeyStoreError) as e:
        print("kilnproxy: %s" % e, file=sys.stderr)
        return cli.exit_status(e)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
