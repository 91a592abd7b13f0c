"""The pieces of `make dist` that need no build: tools/pyz_preamble.py (the pyz's start-up checks) and
tools/build_dist.py's header and requirement handling. The built file itself is tested in test_dist.py."""
import importlib.util
import io
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)          # __name__ is not "__main__": nothing runs
    return module


preamble = _load("pyz_preamble")
build_dist = _load("build_dist")


def test_cache_root_as_pex_computes_it(tmp_path):
    home = str(tmp_path)
    assert preamble._kiln_cache_root({"PEX_ROOT": home + "/x"}) == home + "/x"
    assert preamble._kiln_cache_root({"XDG_CACHE_HOME": home + "/xdg"}) == home + "/xdg/pex"
    old = os.environ.get("HOME")
    os.environ["HOME"] = home
    try:
        assert preamble._kiln_cache_root({}) == home + "/.cache/pex"
    finally:
        os.environ["HOME"] = old


def test_usable_and_unusable_cache_folders(tmp_path):
    assert preamble._kiln_cache_problem(str(tmp_path / "new" / "pex")) is None
    assert os.path.isdir(tmp_path / "new" / "pex")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert preamble._kiln_cache_problem(str(blocker)) == "File exists"      # makedirs on a file
    assert preamble._kiln_cache_problem(str(blocker / "sub")) == "Not a directory"
    err = io.StringIO()
    with pytest.raises(SystemExit) as e:
        preamble._kiln_check_cache({"PEX_ROOT": str(blocker / "sub")}, stderr=err)
    assert e.value.code == 2
    assert err.getvalue() == ("kilnproxy.pyz: cannot use the cache folder %s (Not a directory); set PEX_ROOT to a "
                              "folder this user can write\n" % (blocker / "sub"))


def test_the_hook_leaves_our_own_exceptions_alone(tmp_path):
    """Run as the pyz would: the preamble as __main__ installs the hook; a bootstrap error is one line and exit 1,
    an error in the kiln package keeps its traceback."""
    with open(os.path.join(ROOT, "tools", "pyz_preamble.py"), encoding="utf-8") as f:
        code = f.read()
    pkg = tmp_path / "kiln"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "boom.py").write_text("def go():\n    raise ValueError('ours')\n")
    env = dict(os.environ, PEX_ROOT=str(tmp_path / "cache"))
    boot = code + "\nimport zlib\nraise zlib.error('Error -3 while decompressing data')\n"
    r = subprocess.run([sys.executable, "-c", boot], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr == ("kilnproxy.pyz: cannot start from -c: zlib.error: Error -3 while decompressing data (a "
                        "damaged file? copy it again)\n")
    ours = code + "\nimport sys; sys.path.insert(0, %r)\nfrom kiln import boom\nboom.go()\n" % str(tmp_path)
    r = subprocess.run([sys.executable, "-c", ours], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: ours" in r.stderr


def test_header_after_the_shebang_keeps_the_zip_exact(tmp_path):
    path = tmp_path / "x.pyz"
    with open(path, "wb") as f:
        f.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("__main__.py", "print('ran')\n")
            z.writestr("data/a.txt", "a" * 1000)
    build_dist.add_header(str(path))
    data = path.read_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n" + build_dist.HEADER)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None and z.read("data/a.txt") == b"a" * 1000
        # offsets moved with the bytes: the first local header is where the directory says
        assert data[z.infolist()[0].header_offset:][:4] == b"PK\x03\x04"
    r = subprocess.run([sys.executable, "-I", str(path)], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "ran\n"), r.stderr
    path.write_bytes(data[:len(data) - 40])            # truncated: Python shows our line
    r = subprocess.run([sys.executable, "-I", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "this file is truncated or damaged" in r.stderr and "Traceback" not in r.stderr


def test_runtime_requirements_must_be_pinned(tmp_path):
    pins = build_dist.runtime_requirements()
    assert "gevent==26.9.0" in pins and all("==" in p for p in pins)
    assert not any(p.split("==")[0] in ("pytest", "hypothesis", "selenium", "pytest-timeout") for p in pins)
    loose = tmp_path / "req.txt"
    loose.write_text("gevent==26.9.0\nparamiko>=5  # not pinned\n")
    with pytest.raises(build_dist.BuildError, match="not pinned"):
        build_dist.runtime_requirements(str(loose))


def test_requirements_txt_includes_the_runtime_pins():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert "-r requirements-runtime.txt" in f.read().split("\n")
