"""End to end: the start-up guard on paramiko's private names (sshcompat.PRIVATE_NAMES). On the pinned paramiko every
name is there and the fast path runs; when one the fast path needs is missing (simulated: the probe is asked for a
name paramiko does not have), the proxy logs one WARNING naming it and relays through paramiko's own code, and a
clone through it still arrives intact."""
import os
import textwrap

import pytest

import harness

pytestmark = pytest.mark.e2e

WRAPPER = textwrap.dedent("""\
    # kilnproxy.py with one more private name asked of paramiko than it has (as if paramiko had renamed it)
    from gevent import monkey
    monkey.patch_all()
    import runpy, sys
    sys.path.insert(0, {lib!r})
    from kiln import sshcompat
    sshcompat.PRIVATE_NAMES["fast"] += ("Packetizer._Packetizer__renamed_in_a_future_paramiko",)
    sys.argv[0] = {script!r}
    runpy.run_path({script!r}, run_name="__main__")
    """)


def _clone_and_check(proxy, keys, tmp_path, name):
    payload = os.urandom(3 << 20)
    harness.make_git_repo(proxy.repo_root, "initech/%s.git" % name, {"blob.bin": payload})
    dest = tmp_path / name
    r = harness.run(["git", "clone", "-q", proxy.url("initech/%s.git" % name), str(dest)],
                    env=harness.client_env(keys["user"]))
    assert r.returncode == 0, r.stderr
    assert (dest / "blob.bin").read_bytes() == payload


def test_pinned_paramiko_has_every_private_name(proxy_ssh, keys, tmp_path):
    proxy_ssh.wait_for_log(r"paramiko [\d.]+: all \d+ private names sshcompat uses are present")
    assert "lacks" not in proxy_ssh.read_log()
    _clone_and_check(proxy_ssh, keys, tmp_path, "guard-ok")


def test_a_missing_private_name_falls_back_to_plain_paramiko(tmp_path_factory, keys, sshd_backend, tmp_path):
    d = str(tmp_path_factory.mktemp("proxy-guard"))
    proxy = harness.Proxy(d, backend=sshd_backend, backend_key=keys["backend"])
    wrapper = os.path.join(d, "kilnproxy-renamed.py")
    with open(wrapper, "w") as f:
        f.write(WRAPPER.format(lib=os.path.join(harness.ROOT, "lib"), script=harness.KILNPROXY))
    proxy.script = wrapper
    proxy.add_key(keys["user"] + ".pub")
    proxy.start()
    try:
        line = proxy.wait_for_log(r"WARNING paramiko [\d.]+ lacks (\S+): fast off \(relaying through "
                                  r"paramiko's per-packet code")
        assert line.group(1).rstrip(",") == "Packetizer._Packetizer__renamed_in_a_future_paramiko"
        assert len([ln for ln in proxy.read_log().splitlines() if " lacks " in ln]) == 1
        _clone_and_check(proxy, keys, tmp_path, "guard-fallback")
        # the fallback is real: the client's session ran without ChunkPipes (stdin pipes are paramiko's)
        assert proxy.wait_for_log(r"end .*reason=completed")
    finally:
        assert proxy.stop() == 0
    assert not proxy.problems()
