"""The admin HTTP API: a Bottle app served by gevent's WSGI server in the proxy's process."""
import gc
import json
import logging
import time

import bottle
import greenlet
from gevent.pywsgi import WSGIServer

from .timefmt import go_duration

log = logging.getLogger("kiln.admin")


def count_greenlets():
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet))


def create_app(cfg, server, registry, version):
    app = bottle.Bottle()
    token = cfg.admin.token

    def authorized():
        if token and bottle.request.get_header("Authorization", "") != "Bearer " + token:
            bottle.response.status = 401
            return False
        return True

    @app.get("/healthz")
    def healthz():
        bottle.response.content_type = "text/plain"
        if server.draining:
            bottle.response.status = 503
            return "draining\n"
        return "ok\n"

    @app.get("/info")
    def info():
        if not authorized():
            return {"error": "unauthorized"}
        now = time.time()
        return {"Version": version, "StartTimeEpochSecs": int(server.started),
                "CurrentTimeEpochSecs": int(now), "Uptime": go_duration(now - server.started)}

    @app.get("/connections")
    def connections():
        if not authorized():
            return {"error": "unauthorized"}
        users = [s.as_json() for s in registry.authenticated()]
        return {"CurrentUserCount": len(users), "CurrentlyAuthenticatedUsers": users}

    @app.delete("/connections/<key>")
    def close_connection(key):
        if not authorized():
            return {"error": "unauthorized"}
        session = registry.get(key)
        if session is None:
            bottle.response.status = 404
            return {"error": "no such session"}
        session.close("closed by admin")
        return {"closed": key}

    @app.get("/debug/greenlets")
    def greenlets():
        if not authorized():
            return {"error": "unauthorized"}
        return {"count": count_greenlets(), "sessions": len(registry)}

    return app


class AdminServer:
    def __init__(self, cfg, server, registry, version):
        self.cfg = cfg
        self.app = create_app(cfg, server, registry, version)
        self.wsgi = None

    def start(self):
        self.wsgi = WSGIServer(self.cfg.admin.listen, self.app, log=None, error_log=log)
        self.wsgi.start()
        log.info("admin API on http://%s:%d/", *self.wsgi.address[:2])

    def stop(self):
        wsgi, self.wsgi = self.wsgi, None
        if wsgi is not None:
            wsgi.stop(timeout=2)
