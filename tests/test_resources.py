"""Package resources (the version stamp, the dashboard files) load from a zip, as they must inside
dist/kilnproxy.pyz: files read next to __file__ would not exist there."""
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILN = os.path.join(ROOT, "lib", "kiln")
STAMPED = "0.1.42-0123456789-20260101.000000"


def _zip_package(path):
    with zipfile.ZipFile(path, "w") as z:
        for folder, dirs, files in os.walk(KILN):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".pyc") or name == "_version_stamp.py":
                    continue
                full = os.path.join(folder, name)
                z.write(full, os.path.relpath(full, os.path.dirname(KILN)))
        z.writestr("kiln/_version_stamp.py", '"""Written by the build step; do not edit."""\nVERSION = "%s"\n' % STAMPED)


def test_version_stamp_and_dashboard_are_read_from_a_zip(tmp_path):
    archive = tmp_path / "kiln.zip"
    _zip_package(str(archive))
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from kiln import admin, version\n"
        "assert version.__file__.startswith(%r), version.__file__\n"
        "print(version.current())\n"
        "page = admin.DASHBOARD_DIR.joinpath('index.html').read_text(encoding='utf-8')\n"
        "assert '__NONCE__' in page\n"
        "print('dashboard', len(page))\n" % (str(archive), str(archive)))
    p = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == STAMPED
    assert lines[1].startswith("dashboard ")
