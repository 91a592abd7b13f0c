"""Start-up checks of dist/kilnproxy.pyz, run before pex unpacks anything (pex's --preamble-file: this file heads
the archive's __main__.py). Standard library only; every name starts with _kiln so as not to meet pex's own.

- The cache folder (PEX_ROOT, default $XDG_CACHE_HOME/pex or ~/.cache/pex) must be usable: pex would otherwise warn
  and unpack ~45 MB into a new temporary folder at every start. One line and exit status 2 instead.
- While pex boots (before kilnproxy.py runs), an exception from the archive itself (a damaged member: zlib.error,
  BadZipFile, a bad CRC) is one line and exit status 1 instead of a traceback. Exceptions from our own code pass
  through unchanged.
(A truncated file is no zip archive for Python at all: the build puts a line after the shebang that Python then shows
as the error; see tools/build_dist.py.)
"""
import os as _kiln_os
import sys as _kiln_sys

_KILN_EXIT_CACHE = 2
_KILN_EXIT_DAMAGED = 1


def _kiln_cache_root(environ):
    """The folder pex unpacks into, as pex computes it (pex/variables.py, appdirs.user_cache_dir)."""
    root = environ.get("PEX_ROOT")
    if not root:
        base = environ.get("XDG_CACHE_HOME") or _kiln_os.path.expanduser("~/.cache")
        root = _kiln_os.path.join(base, "pex")
    return _kiln_os.path.realpath(_kiln_os.path.expanduser(root))


def _kiln_cache_problem(root):
    """None when root is (or can be made) a folder we can write; else why not."""
    try:
        _kiln_os.makedirs(root, mode=0o700, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    if not _kiln_os.path.isdir(root):
        return "not a folder"
    if not _kiln_os.access(root, _kiln_os.R_OK | _kiln_os.W_OK | _kiln_os.X_OK):
        return "not writable by this user"
    return None


def _kiln_check_cache(environ=None, stderr=None):
    environ = _kiln_os.environ if environ is None else environ
    root = _kiln_cache_root(environ)
    problem = _kiln_cache_problem(root)
    if problem is not None:
        (stderr or _kiln_sys.stderr).write(
            "kilnproxy.pyz: cannot use the cache folder %s (%s); set PEX_ROOT to a folder this user can write\n"
            % (root, problem))
        raise SystemExit(_KILN_EXIT_CACHE)


def _kiln_ours(tb):
    """Does the traceback pass through kilnproxy's own code (kilnproxy.py, packed by pex under this name, or the
    kiln package), i.e. past pex's boot?"""
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__") or ""
        if module == "kiln" or module.startswith("kiln.") \
                or tb.tb_frame.f_code.co_filename.endswith("__pex_executable__.py"):
            return True
        tb = tb.tb_next
    return False


def _kiln_install_hook(archive):
    previous = _kiln_sys.excepthook

    def _kiln_hook(kind, value, tb):
        if not issubclass(kind, Exception) or _kiln_ours(tb):
            return previous(kind, value, tb)
        try:
            name = kind.__qualname__ if kind.__module__ == "builtins" else kind.__module__ + "." + kind.__qualname__
            _kiln_sys.stderr.write("kilnproxy.pyz: cannot start from %s: %s: %s (a damaged file? copy it again)\n"
                                   % (archive, name, value))
            _kiln_sys.stderr.flush()
        finally:
            _kiln_os._exit(_KILN_EXIT_DAMAGED)

    _kiln_sys.excepthook = _kiln_hook


if __name__ == "__main__":
    _kiln_check_cache()
    _kiln_install_hook(_kiln_sys.argv[0] if _kiln_sys.argv else "kilnproxy.pyz")
