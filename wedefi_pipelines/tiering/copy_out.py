"""COPY ... TO STDOUT in a helper process, for the archive's export.

PostgreSQL sends COPY data as one message per row, and psycopg reads each one in Python
(~1 us a row). Done in the exporting process, that loop competes for the GIL with the
numpy and Arrow work on the previous batches and slows both several times over
(docs/tiering.md, "Measured choices"). This module runs the loop in its own process
and writes the bytes to its stdout in large blocks, which pyarrow's CSV reader consumes
in the exporter. The connection URL comes in the environment (never on a command line);
the statements come on stdin as JSON: {"prelude": [...], "copy": "COPY (...) TO STDOUT ..."}.

On a database error the process prints `SQLSTATE <code>: <message>` on stderr and exits 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

URL_ENV = "WEDEFI_COPY_OUT_URL"
_FLUSH = 4 * 1024 * 1024


class CopyOutError(RuntimeError):
    """The helper's COPY failed; `sqlstate` is PostgreSQL's code when it was a database error."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def start(url: str, prelude: list[str], copy: str) -> subprocess.Popen:
    """Start the helper on `url`; read its stdout, then call `finish`."""
    package_root = str(Path(__file__).resolve().parents[2])  # importable even when not installed
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, URL_ENV: url, "PYTHONPATH": path})
    proc.stdin.write(json.dumps({"prelude": prelude, "copy": copy}).encode())
    proc.stdin.close()
    return proc


def finish(proc: subprocess.Popen, abandon: bool = False) -> None:
    """Wait for the helper; raise CopyOutError if it failed (after `abandon`, just stop it)."""
    if abandon:
        proc.kill()
    proc.stdout.close()
    error = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    code = proc.wait()
    if abandon or code == 0:
        return
    found = re.search(r"^SQLSTATE (\w{5}): (.*)$", error, re.MULTILINE | re.DOTALL)
    if found:
        raise CopyOutError(found.group(2).strip(), found.group(1))
    raise CopyOutError(error or f"the COPY helper exited with {code}")


def main() -> int:
    import psycopg
    from psycopg import pq

    job = json.loads(sys.stdin.read())
    out = sys.stdout.buffer
    try:
        with psycopg.connect(os.environ[URL_ENV], application_name="wedefi-pipelines:archive-export") as conn:
            for statement in job["prelude"]:
                conn.execute(statement)
            conn.commit()
            # libpq's own loop: psycopg's Copy iterator costs ~2 us a row more, in Python
            pgconn = conn.pgconn
            if not pgconn.send_query(job["copy"].encode()) and pgconn.error_message:
                raise psycopg.OperationalError(pgconn.error_message.decode(errors="replace"))
            result = pgconn.get_result()
            if result.status != pq.ExecStatus.COPY_OUT:
                _raise(result)
            get = pgconn.get_copy_data
            parts, size = [], 0
            while True:
                nbytes, data = get(0)
                if nbytes == -1:
                    break
                if nbytes == -2:
                    raise psycopg.OperationalError(pgconn.error_message.decode(errors="replace"))
                parts.append(data)
                size += nbytes
                if size >= _FLUSH:
                    out.write(b"".join(parts))
                    parts, size = [], 0
            out.write(b"".join(parts))
            out.flush()
            while (result := pgconn.get_result()) is not None:
                if result.status != pq.ExecStatus.COMMAND_OK:
                    _raise(result)
    except psycopg.Error as exc:
        sys.stderr.write(f"SQLSTATE {exc.sqlstate}: {exc}\n")
        return 2
    except BrokenPipeError:  # the exporter stopped reading (it failed first)
        return 0
    return 0


def _raise(result) -> None:
    from psycopg import errors, pq

    sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
    message = (result.error_message or b"").decode(errors="replace").strip()
    raise errors.lookup(sqlstate)(message) if sqlstate else RuntimeError(message)


if __name__ == "__main__":
    sys.exit(main())
