"""Ingest throughput: the same 200-slice CT series pushed by dcmtk storescu to our node and to dcmtk
storescp, in one run, over 1 association and over 4 parallel ones.

    python -m bench.ingest [--slices 200] [--repeats 5] [--processes N]

Last line: ``ours_1=… dcmtk_1=… ratio_1=… ours_4=… dcmtk_4=… ratio_4=…`` (slices/s; best of
--repeats), then, for where the time goes: ``ours_1_tmpfs=… ratio_1_tmpfs=… fsync_ms=…`` (our node
with its storage in RAM; one write+fsync of a slice-sized new file on the bench's disk, median).
Our node runs as deployed (``heartloop serve``, SQLite, durable: every slice fsynced and
committed before its success); storescp writes files without fsync. Both dcmtk tools get
TCP_NODELAY=1 (Debian's build otherwise stalls ~44 ms per C-STORE on Nagle's algorithm).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.dcmtk import DCMTK_ENV, require
from tests.helpers.procs import free_port, stop_pid, wait_port


def _push(files: list[Path], port: int, called: str, associations: int) -> float:
    """Wall time for `associations` parallel storescu runs to deliver every file."""
    chunks = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([require("storescu"), "-aec", called, "-aet", "BENCH_TPS", "127.0.0.1", str(port),
                               *map(str, chunk)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for chunk in chunks]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - t0


def run_dcmtk(files: list[Path], associations: int, work: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=work))
    port = free_port()
    cmd = [require("storescp"), "--max-pdu", "131072", "-od", str(out)]
    if associations > 1:
        cmd.append("--fork")
    log = open(work / f"storescp-{port}.log", "wb")
    proc = subprocess.Popen(cmd + [str(port)], env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_port(port, timeout_s=60)
        except TimeoutError:
            log.flush()
            raise TimeoutError(f"storescp never opened port {port} (exit {proc.poll()}): "
                               f"{(work / f'storescp-{port}.log').read_text(errors='replace')[-500:]}") from None
        dt = _push(files, port, "ANY-SCP", associations)
        received = sum(1 for p in out.iterdir() if p.is_file())
        if received != len(files):
            raise RuntimeError(f"storescp stored {received}/{len(files)}")
        return len(files) / dt
    finally:
        stop_pid(proc, timeout_s=20)
        log.close()
        shutil.rmtree(out, ignore_errors=True)


def run_ours(files: list[Path], associations: int, work: Path, processes: int, engine: str,
             storage: Path | None = None) -> float:
    root = Path(tempfile.mkdtemp(dir=storage or work))
    port = free_port()
    cfg = root / "heartloop.toml"
    cfg.write_text(f"""[node]
port = {port}
receive_processes = {processes}
engine = "{engine}"
[storage]
root = "{root / 'data'}"
[series]
stable_age_s = 3600
[limits]
min_free_disk_bytes = 1048576
[http]
enabled = false
""")
    proc = subprocess.Popen([sys.executable, "-m", "heartloop", "--log-level", "WARNING", "serve", "--config",
                             str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout_s=60)
        # Let start-up settle before timing: receiving processes bind and the trainer process
        # finishes importing (~1 s of CPU) — a running service's idle trainer only polls.
        time.sleep(3.0)
        dt = _push(files, port, "HEARTLOOP", associations)
        import sqlite3

        con = sqlite3.connect(root / "data" / "heartloop.db")
        stored = con.execute("select count(*) from instances").fetchone()[0]
        con.close()
        if stored != len(files):
            raise RuntimeError(f"our node stored {stored}/{len(files)}")
        return len(files) / dt
    finally:
        stop_pid(proc, timeout_s=20)
        shutil.rmtree(root, ignore_errors=True)


def slice_fsync_ms(work: Path, size: int, n: int = 100) -> float:
    """Median time to write a new `size`-byte file and fsync it, in `work` (the storage both nodes used)."""
    data = os.urandom(size)
    times = []
    d = Path(tempfile.mkdtemp(dir=work))
    try:
        os.sync()
        for i in range(n):
            fd = os.open(d / f"{i}.bin", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                t0 = time.perf_counter()
                os.fsync(fd)
                times.append(time.perf_counter() - t0)
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return sorted(times)[len(times) // 2] * 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--processes", type=int, default=0, help="our receiving processes for the 4-association run "
                    "(0: the configured default)")
    ap.add_argument("--engine", default="lean", choices=["lean", "pynetdicom"])
    args = ap.parse_args(argv)
    for tool in ("storescu", "storescp"):
        try:
            require(tool)
        except FileNotFoundError as exc:
            sys.exit(str(exc))

    from heartloop.config import load_settings
    from heartloop.phantom import make_patient, write_patient

    work = Path(tempfile.mkdtemp(prefix="hl-bench-ingest-"))
    try:
        patient = make_patient(1, rows=512, n_slices=args.slices)
        files = sorted(write_patient(patient, work / "series").glob("CT_*.dcm"))
        procs4 = args.processes or load_settings(environ={}).node.receive_processes
        results = {}
        for label, assoc, procs in (("1", 1, 1), ("4", 4, procs4)):
            ours_runs, dcmtk_runs = [], []
            for _ in range(args.repeats):  # interleaved, each after a sync: neither inherits the other's dirty pages
                os.sync()
                ours_runs.append(run_ours(files, assoc, work, procs, args.engine))
                os.sync()
                dcmtk_runs.append(run_dcmtk(files, assoc, work))
            ours, dcmtk = max(ours_runs), max(dcmtk_runs)
            results[label] = (ours, dcmtk)
            print(f"{assoc} association(s): ours {ours:.0f} slices/s ({procs} receiving process(es), engine "
                  f"{args.engine}), dcmtk storescp {dcmtk:.0f} slices/s", flush=True)
        (o1, d1), (o4, d4) = results["1"], results["4"]
        extra = ""
        shm = Path("/dev/shm")
        if shm.is_dir() and shutil.disk_usage(shm).free > 4 * sum(f.stat().st_size for f in files):
            # Where the time goes: the same node with its storage in RAM (fsync costs nothing there),
            # and what one fsync of a slice-sized new file costs on the disk the node used.
            tmpfs = max(run_ours(files, 1, work, 1, args.engine, storage=shm) for _ in range(args.repeats))
            fsync_ms = slice_fsync_ms(work, files[0].stat().st_size)
            print(f"1 association, storage on tmpfs (no disk): ours {tmpfs:.0f} slices/s ({1000 / tmpfs:.2f} ms per "
                  f"slice). One fsync of a new {files[0].stat().st_size // 1024} KiB file on the bench's disk: "
                  f"{fsync_ms:.2f} ms; storescp, which does not fsync, takes {1000 / d1:.2f} ms per slice in all",
                  flush=True)
            extra = f" ours_1_tmpfs={tmpfs:.0f} ratio_1_tmpfs={tmpfs / d1:.2f} fsync_ms={fsync_ms:.2f}"
        print(f"ours_1={o1:.0f} dcmtk_1={d1:.0f} ratio_1={o1 / d1:.2f} "
              f"ours_4={o4:.0f} dcmtk_4={d4:.0f} ratio_4={o4 / d4:.2f}{extra}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
