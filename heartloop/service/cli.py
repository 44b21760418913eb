"""`heartloop` — the one command. Each subcommand's --help explains it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from heartloop import __version__
from heartloop.config import ConfigError

log = logging.getLogger("heartloop")


def _settings(args: argparse.Namespace, **extra: Any):  # type: ignore[no-untyped-def]
    from heartloop.config import load_settings

    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides.setdefault("storage", {})["root"] = str(args.data_dir)
    if getattr(args, "dicom_port", None) is not None:
        overrides.setdefault("node", {})["port"] = args.dicom_port
    if getattr(args, "http_port", None) is not None:
        overrides.setdefault("http", {})["port"] = args.http_port
    for k, v in extra.items():
        overrides.setdefault(k, {}).update(v)
    return load_settings(getattr(args, "config", None), overrides=overrides)


def _iso(t: float | None) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if t else ""


# -- serve ------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from heartloop.service.app import Service

    settings = _settings(args)
    service = Service(settings)
    if args.demo:
        threading.Thread(target=_demo_push, args=(service, args.demo, args.demo_seed), daemon=True,
                         name="demo").start()
    print(f"HeartLoop {__version__}: DICOM node {settings.node.ae_title}@{settings.node.host}:{settings.node.port}, "
          f"data in {settings.storage_root} — Ctrl-C to stop", flush=True)
    service.run_forever()
    return 0


def _demo_push(service, n: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Play the TPS: make `n` synthetic patients and push them to ourselves, then report cases."""
    from heartloop.config import Destination
    from heartloop.dicom_node.scu import iter_dicom_files, send_files
    from heartloop.phantom import make_patient, write_patient

    service.started.wait(30)
    s = service.settings
    out = s.storage_root / "demo-phantoms"
    me = Destination("self", s.node.ae_title, "127.0.0.1" if s.node.host in ("0.0.0.0", "") else s.node.host,
                     service.scp.port)
    for k in range(n):
        pdir = write_patient(make_patient(seed + k), out)
        files = list(iter_dicom_files(pdir))
        t0 = time.monotonic()
        res = send_files(me, files, calling_ae="DEMO_TPS")
        ok = sum(r.ok for r in res)
        print(f"demo: pushed synthetic patient {k + 1}/{n}: {ok}/{len(files)} instances accepted "
              f"in {time.monotonic() - t0:.1f} s", flush=True)
    print(f"demo: cases become READY {s.series.stable_age_s:.0f} s after their last slice; "
          f"watch with: heartloop cases --data-dir {s.storage_root}", flush=True)
    deadline = time.monotonic() + s.series.stable_age_s + 60
    while time.monotonic() < deadline:
        cases = service.store.list_cases()
        if cases and all(c.state != "RECEIVED" for c in cases):
            break
        time.sleep(1)
    for c in service.store.list_cases():
        print(f"demo: case {c.id}: {c.state} ({c.n_slices or '?'} slices){' — ' + c.reason if c.reason else ''}",
              flush=True)


# -- cases ------------------------------------------------------------------------------------------

def cmd_cases(args: argparse.Namespace) -> int:
    from heartloop.store import Store

    settings = _settings(args)
    store = Store.from_settings(settings)
    rows = []
    for c in store.list_cases(args.state or None):
        linked = store.linked_series(c.id)
        rows.append({
            "id": c.id, "state": c.state, "reason": c.reason, "n_slices": c.n_slices,
            "patient_id": c.patient_id, "study_uid": c.study_uid, "ct_series_uid": c.ct_series_uid,
            "frame_of_reference_uid": c.frame_of_reference_uid,
            "linked": [{"modality": s.modality, "series_uid": s.series_uid} for s in linked],
            "created_at": _iso(c.created_at), "updated_at": _iso(c.updated_at),
        })
    unlinked = [{"modality": s.modality, "series_uid": s.series_uid, "reason": s.reason}
                for s in store.unlinked_series()]
    store.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for u in unlinked:
        print(f"waiting: {u['modality']} series {u['series_uid']} — {u['reason']}")
    if not rows:
        print("no cases yet")
        return 0
    print(f"{'id':>4}  {'state':<12} {'slices':>6}  {'linked':<16} {'updated (UTC)':<19}  patient / reason")
    for r in rows:
        linked = ",".join(sorted({x["modality"] for x in r["linked"]})) or "-"
        print(f"{r['id']:>4}  {r['state']:<12} {r['n_slices'] or '':>6}  {linked:<16} {r['updated_at']:<19}  "
              f"{r['patient_id']}{' — ' + r['reason'] if r['reason'] else ''}")
    return 0


# -- phantom / push / echo --------------------------------------------------------------------------

def cmd_phantom(args: argparse.Namespace) -> int:
    from heartloop.phantom import write_cohort

    kwargs: dict[str, Any] = {}
    if args.rows:
        kwargs["rows"] = args.rows
    if args.slices:
        kwargs["n_slices"] = args.slices
    if args.uneven:
        kwargs["uneven"] = True
    dirs = write_cohort(args.patients, args.seed, Path(args.out), **kwargs)
    for d in dirs:
        print(d)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from heartloop.dicom_node.scu import AssociationFailed, iter_dicom_files, parse_target, send_files

    dest = parse_target(args.to)
    files = list(iter_dicom_files(Path(args.dir)))
    if not files:
        print(f"no DICOM files under {args.dir}", file=sys.stderr)
        return 2
    n = max(1, min(args.associations, len(files)))
    chunks = [files[i::n] for i in range(n)]
    t0 = time.monotonic()
    failed: list[str] = []

    def one(chunk: list[Path]) -> int:
        res = send_files(dest, chunk, calling_ae=args.calling_ae)
        for r in res:
            if not r.ok:
                failed.append(f"{r.path}: {r.error}")
        return sum(r.ok for r in res)

    try:
        with ThreadPoolExecutor(n) as pool:
            ok = sum(pool.map(one, chunks))
    except AssociationFailed as exc:
        print(f"push failed: {exc}", file=sys.stderr)
        return 1
    dt = time.monotonic() - t0
    print(f"sent {ok}/{len(files)} instances to {dest.ae_title}@{dest.host}:{dest.port} in {dt:.1f} s "
          f"({ok / dt if dt else 0:.0f}/s)")
    for f in failed[:20]:
        print(f"  refused: {f}", file=sys.stderr)
    return 0 if ok == len(files) else 1


def cmd_echo(args: argparse.Namespace) -> int:
    from heartloop.dicom_node.scu import echo, parse_target

    dest = parse_target(args.to)
    ok = echo(dest, calling_ae=args.calling_ae)
    print(f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}: {'success' if ok else 'FAILED'}")
    return 0 if ok else 1


# -- outbox / quarantine / config -------------------------------------------------------------------

def cmd_outbox(args: argparse.Namespace) -> int:
    from heartloop.store import Store

    store = Store.from_settings(_settings(args))
    if args.retry:
        store.retry_output(args.retry)
        print(f"outbox item {args.retry} queued again")
    for o in store.outputs():
        print(f"{o.id:>4} {o.state:<8} to {o.destination:<10} attempts={o.attempts:<3} case={o.case_id or '-'} "
              f"{o.description} {('— ' + o.last_error) if o.last_error and o.state != 'SENT' else ''}")
    store.dispose()
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    from heartloop.store import Store

    store = Store.from_settings(_settings(args))
    rows = store.quarantined()
    if args.json:
        print(json.dumps([{"id": q.id, "received_at": _iso(q.received_at), "calling_ae": q.calling_ae,
                           "status": f"0x{q.status:04X}", "reason": q.reason, "path": q.path} for q in rows], indent=2))
    else:
        for q in rows:
            print(f"{q.id:>4} {_iso(q.received_at)} from {q.calling_ae:<16} 0x{q.status:04X} {q.reason}  [{q.path}]")
        if not rows:
            print("quarantine is empty")
    store.dispose()
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from heartloop.config import settings_to_dict

    settings = _settings(args)
    print(json.dumps(settings_to_dict(settings), indent=2))
    return 0


# -- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="heartloop",
        description="HeartLoop: contours the heart on planning CTs pushed by the TPS, learns from dosimetrists' "
                    "corrections, and sends structures and dose reports back.",
    )
    p.add_argument("--version", action="version", version=f"heartloop {__version__}")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="TOML settings file (default: $HEARTLOOP_CONFIG, else built-in defaults)")
        sp.add_argument("--data-dir", help="storage root: SQLite database and files (overrides storage.root)")

    sp = sub.add_parser("serve", help="run the DICOM node and workers until SIGTERM/SIGINT",
                        description="Run the service in the foreground: the DICOM node receives CT/RTDOSE/RTPLAN/"
                                    "RTSTRUCT, series are assembled into cases, outputs are sent to the TPS. "
                                    "Stops cleanly on SIGTERM or Ctrl-C.")
    common(sp)
    sp.add_argument("--dicom-port", type=int, help="DICOM port (overrides node.port)")
    sp.add_argument("--http-port", type=int, help="web port for the review UI (overrides http.port)")
    sp.add_argument("--demo", type=int, default=0, metavar="N",
                    help="after starting, push N synthetic patients to ourselves so cases arrive")
    sp.add_argument("--demo-seed", type=int, default=1, help="seed of the first demo patient")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("cases", help="list cases with state, reason and identifiers",
                        description="List every case (one planning CT series) with its state and, when it is "
                                    "INCOMPLETE/UNSUPPORTED, the reason.")
    common(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--state", action="append", help="only cases in this state (repeatable)")
    sp.set_defaults(func=cmd_cases)

    sp = sub.add_parser("phantom", help="write synthetic thorax patients (CT, RTDOSE, true heart)",
                        description="Write N deterministic synthetic planning CTs with RTDOSE and the true heart "
                                    "mask (NIfTI) — for demos, tests and benchmarks.")
    sp.add_argument("--patients", type=int, required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True)
    sp.add_argument("--rows", type=int, help="image matrix (default 512)")
    sp.add_argument("--slices", type=int, help="number of slices (default: 100-200 by seed)")
    sp.add_argument("--uneven", action="store_true", help="unevenly spaced (but gap-free) slices")
    sp.set_defaults(func=cmd_phantom)

    sp = sub.add_parser("push", help="C-STORE every DICOM file under DIR (plays the TPS)",
                        description="Send every DICOM file under DIR to a DICOM node, as a TPS would.")
    sp.add_argument("dir")
    sp.add_argument("--to", required=True, metavar="AE@HOST:PORT")
    sp.add_argument("--calling-ae", default="HEARTLOOP_SCU")
    sp.add_argument("--associations", type=int, default=1, help="parallel associations")
    sp.set_defaults(func=cmd_push)

    sp = sub.add_parser("echo", help="C-ECHO a DICOM node (is the TPS reachable?)")
    sp.add_argument("to", metavar="AE@HOST:PORT")
    sp.add_argument("--calling-ae", default="HEARTLOOP")
    sp.set_defaults(func=cmd_echo)

    sp = sub.add_parser("outbox", help="list outputs queued for the TPS; --retry ID re-queues a failed one")
    common(sp)
    sp.add_argument("--retry", type=int, metavar="ID")
    sp.set_defaults(func=cmd_outbox)

    sp = sub.add_parser("quarantine", help="list refused datasets with the reason")
    common(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_quarantine)

    sp = sub.add_parser("config", help="validate the settings and print the effective values")
    common(sp)
    sp.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: already running" is normal here
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
