"""A throwaway PostgreSQL server for the store tests: initdb in a temp dir, a free port, stop by PID."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers.procs import free_port, stop_pid, wait_for


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class PostgresServer:
    def __init__(self) -> None:
        initdb, postgres = _bin("initdb"), _bin("postgres")
        if not initdb or not postgres:
            raise FileNotFoundError("PostgreSQL server binaries not found (apt-get install postgresql)")
        # Explicitly under /tmp: the postgres user must reach it (pytest's own dirs are root-only).
        self.dir = Path(tempfile.mkdtemp(prefix="hl-pg-", dir="/tmp"))
        self.port = free_port()
        run_as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres system user
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        data = self.dir / "data"
        subprocess.run(run_as + [initdb, "-D", str(data), "-A", "trust", "-U", "heartloop", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        self.proc = subprocess.Popen(
            run_as + [postgres, "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.dir),
                      "-c", "fsync=off", "-c", "full_page_writes=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        psql = _bin("psql")

        def ready() -> bool:
            r = subprocess.run([psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "heartloop", "-d", "postgres",
                                "-c", "select 1"], capture_output=True, timeout=10)
            return r.returncode == 0

        wait_for(ready, 30, 0.2, what="PostgreSQL to start")
        self._psql = psql
        self._n = 0

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        self._n += 1
        name = f"hl_test_{self._n}"
        subprocess.run([self._psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "heartloop", "-d", "postgres",
                        "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True, timeout=30)
        return f"postgresql+psycopg://heartloop@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        stop_pid(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
