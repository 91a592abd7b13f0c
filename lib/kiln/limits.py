"""Process and per-source limits: descriptor limit at start, per-source penalties after failed logins."""
import resource


def raise_nofile(log):
    """Raise the soft RLIMIT_NOFILE to the hard limit (each connection holds a socket, and a local child 3 pipes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, e)
        else:
            soft = hard
    log.info("descriptor limit: soft=%d hard=%d", soft, hard)
    return soft, hard
