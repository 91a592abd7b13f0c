"""log.py: paramiko's ERROR lines reach the log once per distinct message, without their traceback lines."""
import io
import logging

from kiln import log as kiln_log


def test_paramiko_errors_once_without_tracebacks():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        kiln_log.setup(stream=stream)
        plog = logging.getLogger("paramiko.transport")
        for chan in (7, 9):
            plog.error("Exception (server): Channel request for unknown channel %d", chan)
            for line in ["Traceback (most recent call last):", '  File "x.py", line 1, in run', "    boom()",
                         "paramiko.ssh_exception.SSHException: unknown channel", ""]:
                plog.error(line)
        plog.warning("Oops, unhandled type 3")            # below ERROR: paramiko's chatter stays out
        plog.error("Socket exception: Connection reset by peer (104)")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging.getLogger("paramiko").setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("WARNING paramiko: Exception (server): Channel request for unknown channel 7 (logged once)")
    assert "Socket exception: Connection reset by peer (104)" in lines[1]
    assert "Traceback" not in stream.getvalue()
