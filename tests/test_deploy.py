"""deploy/: the systemd units pass `systemd-analyze verify`, keep the exposure score README states, and agree with
the code (descriptor names, the drain timeout, the example config). Running under them: test_e2e_systemd.py and
test_dist.py."""
import os
import re
import shutil
import subprocess

import pytest

from kiln import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
UNITS = ["kilnproxy.service", "kilnproxy.socket", "kilnproxy-admin.socket"]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing (apt-get install systemd)")


def unit(name):
    """A unit file as {section: {key: [values]}} (keys may repeat)."""
    parsed = {}
    section = None
    with open(os.path.join(DEPLOY, name), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                section = parsed.setdefault(line.strip("[]"), {})
                continue
            key, _, value = line.partition("=")
            section.setdefault(key, []).append(value)
    return parsed


@needs_analyze
def test_units_pass_systemd_analyze_verify():
    r = subprocess.run([ANALYZE, "verify"] + UNITS, cwd=DEPLOY, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip() == "", r.stderr


@needs_analyze
def test_security_exposure_is_what_readme_says():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        documented = re.search(r"Overall exposure level for kilnproxy\.service: (\d+\.\d+)", f.read())
    assert documented, "README states the score of `systemd-analyze security --offline=yes`"
    r = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", "./kilnproxy.service"], cwd=DEPLOY,
                       capture_output=True, text=True, timeout=120)
    measured = re.search(r"Overall exposure level for kilnproxy\.service: (\d+\.\d+)", r.stdout)
    assert measured, r.stdout[-2000:] + r.stderr
    assert float(measured.group(1)) <= float(documented.group(1)), r.stdout


def test_service_is_what_serve_expects():
    service = unit("kilnproxy.service")["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["KillMode"] == ["mixed"]         # SIGTERM to serve only: local git/hg children finish the drain
    drain = config.build({}, ROOT).timeouts.drain
    stop = service["TimeoutStopSec"][0]
    assert stop.endswith("s") and float(stop[:-1]) > drain + 5 + 2   # drain, the 5 s join after it, admin stop
    assert any("PEX_ROOT=%C/kilnproxy" in v for v in service["Environment"])
    assert service["CacheDirectory"] == ["kilnproxy"] and service["StateDirectory"] == ["kilnproxy"]
    for setting in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "MemoryDenyWriteExecute"):
        assert service[setting] == ["yes"], setting
    assert service["ProtectSystem"] == ["strict"]
    assert service["SystemCallFilter"][0] == "@system-service"
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert int(service["LimitNOFILE"][0]) >= 65536
    assert service["User"] == ["kilnproxy"]


def test_sockets_are_named_as_activation_looks_them_up():
    assert unit("kilnproxy.socket")["Socket"]["FileDescriptorName"] == ["ssh"]
    assert unit("kilnproxy-admin.socket")["Socket"]["FileDescriptorName"] == ["admin"]
    for name in ("kilnproxy.socket", "kilnproxy-admin.socket"):
        assert unit(name)["Socket"]["Service"] == ["kilnproxy.service"]


def test_example_config_is_valid_and_uses_the_state_directory():
    cfg = config.load(os.path.join(DEPLOY, "kilnproxy.toml"))
    assert cfg.state_dir == "/var/lib/kilnproxy"          # StateDirectory=kilnproxy
    assert cfg.keystore.path.startswith("/var/lib/kilnproxy/")
    assert cfg.log.format == "json"
    exec_start = unit("kilnproxy.service")["Service"]["ExecStart"][0]
    assert exec_start.endswith("serve --config /etc/kilnproxy/kilnproxy.toml")
