#!/usr/bin/env python3
"""Build dist/kilnproxy.pyz: one executable file with KilnProxy and every runtime dependency (`make dist`).

    python tools/build_dist.py [--out dist/kilnproxy.pyz] [--wheelhouse build/wheelhouse] [--pex PEX]

Steps: (1) the wheels pinned in requirements-runtime.txt, into a wheel folder (reused offline when complete, else
fetched with `pip download`); (2) a clean copy of the code git tracks (kilnproxy.py, lib/kiln) with the version
stamped into it; (3) pex packs both, resolving only from the wheel folder (--no-pypi, pip's own configuration
ignored); (4) a line after the shebang makes Python name the problem if the file is ever truncated (Python then
reads it as a script: see HEADER). pex writes every entry with a fixed 1980 timestamp and no .pyc files, so the same
commit and wheels give a byte-identical file; the build prints its sha256.

Standard library only; run it with the Python the pyz is for (the wheels are that minor version's).
"""
import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_REQUIREMENTS = os.path.join(ROOT, "requirements-runtime.txt")
PREAMBLE = os.path.join(ROOT, "tools", "pyz_preamble.py")
SHEBANG = "/usr/bin/env python3"
# Read by Python only when the archive is unreadable as a zip (truncated): it runs the file as a script and stops at
# the unterminated string on line 3, showing it. latin-1 because the zip bytes after it are not UTF-8.
HEADER = (b"# -*- coding: latin-1 -*-\n"
          b"'kilnproxy.pyz: this file is truncated or damaged (Python found no zip archive in it): copy it again\n")


class BuildError(Exception):
    pass


def _run(args, **kwargs):
    print("+ " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run(args, **kwargs)


def runtime_requirements(path=RUNTIME_REQUIREMENTS):
    """The pinned requirement lines (name==version) of requirements-runtime.txt."""
    pins = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                if "==" not in line:
                    raise BuildError("%s: %r is not pinned (name==version)" % (path, line))
                pins.append(line)
    return pins


def fill_wheelhouse(wheelhouse, requirements, python=sys.executable):
    """Every pinned wheel in `wheelhouse`: offline from what is there, else downloaded (binary wheels only)."""
    os.makedirs(wheelhouse, exist_ok=True)
    common = [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
              "--no-deps", "--dest", wheelhouse, "-r", requirements]
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        env.pop(var, None)
    if _run(common + ["--no-index", "--find-links", wheelhouse], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL).returncode == 0:
        return "offline"
    if _run(common, env=dict(os.environ)).returncode != 0:
        raise BuildError("pip download of %s into %s failed" % (requirements, wheelhouse))
    return "downloaded"


def tracked_sources():
    """The files of the code that git tracks (kilnproxy.py and lib/kiln), relative to ROOT."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--", "kilnproxy.py", "lib/kiln"],
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError("git ls-files failed (make dist builds from a git checkout): %s" % e) from None
    files = [name for name in out.decode("utf-8").split("\0") if name]
    if "kilnproxy.py" not in files:
        raise BuildError("kilnproxy.py is not tracked by git in %s" % ROOT)
    return files


def stage(stage_dir, version_text):
    """Copy the tracked code into stage_dir: kilnproxy.py (pex's entry point) and src/kiln/... (the package), with
    the version stamped into the copy."""
    for rel in tracked_sources():
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):       # deleted in the work tree but not yet in git
            continue
        dest = os.path.join(stage_dir, "src" + rel[len("lib"):] if rel.startswith("lib/") else rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o644)
    sys.path.insert(0, os.path.join(ROOT, "lib"))
    from kiln import version
    version.write_stamp(version_text, os.path.join(stage_dir, "src", "kiln", version.STAMP_NAME))


def current_version():
    sys.path.insert(0, os.path.join(ROOT, "lib"))
    from kiln import version
    v = version.from_git(ROOT)
    if v is None:
        raise BuildError("cannot compute the version: not a git checkout with history")
    return v


def pex_command(pex, stage_dir, wheelhouse, requirements, output, pex_root):
    return [pex,
            "--no-pypi", "--find-links", wheelhouse, "--no-use-pip-config", "-r", requirements,
            "--sources-directory", os.path.join(stage_dir, "src"), "--exe", os.path.join(stage_dir, "kilnproxy.py"),
            "--preamble-file", PREAMBLE,
            "--python-shebang", SHEBANG,
            # PEX_ROOT must survive into our process: serve re-executes itself (memory.py) and the new process
            # would otherwise unpack again into ~/.cache/pex
            "--no-strip-pex-env",
            "--pex-root", pex_root,
            "--output-file", output]


def add_header(path):
    """Insert HEADER after the shebang line, moving the zip's offsets by as much (every central directory entry's
    local header offset and the end record's directory offset), so that the archive stays exact for every reader."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if not data.startswith(b"#!"):
        raise BuildError("%s does not start with a shebang" % path)
    first = data.index(b"\n") + 1
    end = len(data) - 22
    if data[end:end + 4] != b"PK\x05\x06":
        raise BuildError("%s: no zip end record without a comment at its end" % path)
    entries, directory_size, directory = struct.unpack_from("<HII", data, end + 10)
    if entries == 0xFFFF or directory == 0xFFFFFFFF or data[directory:directory + 4] != b"PK\x01\x02":
        raise BuildError("%s: unexpected zip layout (zip64, or offsets not from the file's start)" % path)
    shift, at = len(HEADER), directory
    for _ in range(entries):
        if data[at:at + 4] != b"PK\x01\x02":
            raise BuildError("%s: damaged central directory" % path)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        (local,) = struct.unpack_from("<I", data, at + 42)
        struct.pack_into("<I", data, at + 42, local + shift)
        at += 46 + name_len + extra_len + comment_len
    struct.pack_into("<I", data, end + 16, directory + shift)
    with open(path, "wb") as f:
        f.write(data[:first] + HEADER + data[first:])
    with zipfile.ZipFile(path) as z:          # every member readable at its new place, CRCs checked
        bad = z.testzip()
    if bad is not None:
        raise BuildError("%s: member %s unreadable after adding the header" % (path, bad))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(out, wheelhouse, pex, pex_root, python=sys.executable):
    requirements = os.path.abspath(RUNTIME_REQUIREMENTS)
    runtime_requirements(requirements)           # every line pinned, or stop here
    how = fill_wheelhouse(wheelhouse, requirements, python)
    print("wheels: %s (%s)" % (wheelhouse, how), file=sys.stderr)
    version_text = current_version()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-dist-") as tmp:
        stage_dir = os.path.join(tmp, "stage")
        stage(stage_dir, version_text)
        built = os.path.join(tmp, "kilnproxy.pyz")
        if _run(pex_command(pex, stage_dir, wheelhouse, requirements, built, pex_root),
                stdout=sys.stderr).returncode != 0:
            raise BuildError("pex failed")
        add_header(built)
        os.chmod(built, 0o755)
        partial = out + ".partial"
        shutil.copyfile(built, partial)
        os.chmod(partial, 0o755)
        os.replace(partial, out)
    return version_text, sha256(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "dist", "kilnproxy.pyz"))
    p.add_argument("--wheelhouse", default=os.environ.get("KILN_WHEELHOUSE") or os.path.join(ROOT, "build",
                                                                                              "wheelhouse"))
    p.add_argument("--pex", default=os.path.join(os.path.dirname(sys.executable), "pex"),
                   help="the pex command (default: next to this Python, as in .venv-dist)")
    p.add_argument("--pex-root", default=os.path.join(ROOT, "build", "pex-root"),
                   help="pex's own cache while building")
    args = p.parse_args(argv)
    try:
        version_text, digest = build(os.path.abspath(args.out), os.path.abspath(args.wheelhouse), args.pex,
                                     os.path.abspath(args.pex_root))
    except BuildError as e:
        print("build_dist: %s" % e, file=sys.stderr)
        return 1
    print("%s %s %s" % (args.out, version_text, digest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
