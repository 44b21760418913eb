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
    # The console (stdout), not the log: the review UI's address and, on the first run, the
    # administrator's password, shown once.
    service = Service(settings, console=lambda message: print(message, flush=True))
    if args.demo:
        threading.Thread(target=_demo_push, args=(service, args.demo, args.demo_seed), daemon=True,
                         name="demo").start()
    print(f"HeartLoop {__version__}: data in {settings.storage_root} — Ctrl-C to stop", flush=True)
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
        res = send_files(me, files, calling_ae="DEMO_TPS", timeout_s=s.node.dimse_timeout_s)
        ok = sum(r.ok for r in res)
        print(f"demo: pushed synthetic patient {k + 1}/{n}: {ok}/{len(files)} instances accepted "
              f"in {time.monotonic() - t0:.1f} s", flush=True)
    print(f"demo: a case is assembled {s.series.stable_age_s:.0f} s after its last slice, then contoured by the "
          "current model (NO_MODEL until one is trained from corrections); "
          f"watch with: heartloop cases --data-dir {s.storage_root}", flush=True)
    deadline = time.monotonic() + s.series.stable_age_s + 60
    while time.monotonic() < deadline:
        cases = service.store.list_cases()
        if cases and all(c.state not in ("RECEIVED", "READY") for c in cases):
            break
        time.sleep(1)
    for c in service.store.list_cases():
        print(f"demo: case {c.id}: {c.state} ({c.n_slices or '?'} slices){' — ' + c.reason if c.reason else ''}",
              flush=True)
    if service.web is not None:
        print(f"demo: review the cases in the browser at {service.web.url} — log in as 'admin' (first-run password "
              "above, or $HEARTLOOP_ADMIN_PASSWORD); add reviewers with: heartloop user add", flush=True)


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
        res = send_files(dest, chunk, calling_ae=args.calling_ae, timeout_s=args.timeout)
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


# -- dose -------------------------------------------------------------------------------------------

_STATS_ORDER = ("volume_cc", "mean_gy", "min_gy", "max_gy", "d2_gy", "d98_gy", "v5_pct", "v10_pct", "v20_pct",
                "v30_pct", "v5_cc", "v10_cc", "v20_cc", "v30_cc", "outside_fraction")


def cmd_dose_stats(args: argparse.Namespace) -> int:
    """Metrics of one RTSTRUCT ROI on an RTDOSE (or the BEAM doses of one plan), from the files alone."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from heartloop.dicom_node.rtdose import DoseError, read_rtdose
    from heartloop.dicom_node.rtstruct import list_rois, rtstruct_contours
    from heartloop.dose import dose_on_contours

    settings = _settings(args)
    try:
        rtstruct = pydicom.dcmread(args.rtstruct)
        doses = [pydicom.dcmread(path) for path in args.rtdose]
        plans = [pydicom.dcmread(path, stop_before_pixels=True) for path in args.rtplan or []]
    except InvalidDicomError as exc:
        print(f"error: not a DICOM file: {exc}", file=sys.stderr)
        return 2
    if str(rtstruct.get("Modality", "")) != "RTSTRUCT":
        print(f"error: {args.rtstruct} is not an RTSTRUCT (Modality {rtstruct.get('Modality', '?')})", file=sys.stderr)
        return 2
    try:
        if args.roi:
            contours = rtstruct_contours(rtstruct, roi_name=args.roi)
        else:
            contours = rtstruct_contours(rtstruct, roi_names=settings.rtstruct.heart_roi_names)
    except ValueError as exc:
        hint = "" if args.roi else " — name the ROI with --roi NAME"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    try:
        if plans:
            from heartloop.dicom_node.rtdose import select_case_dose

            dose = select_case_dose(doses, frame_of_reference_uid=contours.frame_of_reference_uid, rtplans=plans)
        else:
            dose = read_rtdose(doses, frame_of_reference_uid=contours.frame_of_reference_uid)
        stats = dose_on_contours(contours, dose, supersample=settings.dose.contour_supersample,
                                 dvh_bin_gy=settings.dose.dvh_bin_gy)
    except (DoseError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = stats.to_dict()
    out: dict[str, Any] = {k: metrics[k] for k in _STATS_ORDER if k in metrics}
    out.update({k: v for k, v in metrics.items() if k not in out})
    out["roi_name"] = contours.name
    out["rtdose_sop_instance_uids"] = sorted({str(d.SOPInstanceUID) for d in doses})
    if args.plot:
        _plot_dvh(Path(args.plot), stats, contours.name)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"ROI {contours.name!r} ({len(list_rois(rtstruct))} ROI(s) in {args.rtstruct}), "
          f"dose from {len(doses)} RTDOSE file(s)")
    units = {"_cc": "cc", "_gy": "Gy", "_pct": "%"}
    for key in _STATS_ORDER:
        if key in metrics:
            unit = next((u for suffix, u in units.items() if key.endswith(suffix)), "")
            print(f"  {key:<17} {metrics[key]:>10.3f} {unit}")
    if args.plot:
        print(f"DVH written to {args.plot}")
    return 0


def _plot_dvh(path: Path, stats: Any, roi_name: str) -> None:
    """The cumulative DVH as a PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        ax.plot(stats.dvh_dose_gy, stats.dvh_volume_pct, color="tab:red", lw=1.8, label=roi_name)
        ax.axvline(stats.mean_gy, color="0.4", ls="--", lw=1, label=f"mean {stats.mean_gy:.2f} Gy")
        ax.set_xlabel("Dose (Gy)")
        ax.set_ylabel("Volume (%)")
        ax.set_ylim(0, 102)
        ax.set_xlim(0, max(float(stats.max_gy) * 1.05, 1.0))
        ax.grid(alpha=0.3)
        ax.set_title(f"Cumulative DVH — {roi_name} ({stats.volume_cc:.1f} cc)")
        ax.legend(loc="upper right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


_EXPORT_COLUMNS = ("kind", "id", "case_id", "label", "reference_label", "other_label", "roi_name", "model_version",
                   "mean_gy", "mean_delta_gy", "flagged", "reasons", "computed_at", "rtstruct_sop_instance_uid",
                   "rtdose_sop_instance_uids", "description")


def _dose_export_rows(store: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = store.all_dose_rows()
    results = []
    for r in rows.results:
        results.append({
            "id": r.id, "case_id": r.case_id, "label": r.label, "roi_name": r.roi_name,
            "model_version": r.model_version, "mean_gy": r.mean_gy, "computed_at": _iso(r.computed_at),
            "rtstruct_sop_instance_uid": r.rtstruct_sop_instance_uid,
            "rtdose_sop_instance_uids": json.loads(r.rtdose_sop_instance_uids or "[]"),
            "description": r.description, "metrics": json.loads(r.metrics_json),
        })
    deltas = []
    for d in rows.deltas:
        deltas.append({
            "id": d.id, "case_id": d.case_id, "reference_label": d.reference_label, "other_label": d.other_label,
            "reference_result_id": d.reference_result_id, "other_result_id": d.other_result_id,
            "mean_delta_gy": d.mean_delta_gy, "flagged": bool(d.flagged), "reasons": json.loads(d.reasons or "[]"),
            "computed_at": _iso(d.computed_at), "delta": json.loads(d.delta_json),
        })
    return results, deltas


def cmd_dose_export(args: argparse.Namespace) -> int:
    """Every stored dose result and delta, as CSV or JSON (no patient identifiers: join on case_id)."""
    import csv
    import io

    from heartloop.store import Store

    store = Store.from_settings(_settings(args))
    try:
        results, deltas = _dose_export_rows(store)
    finally:
        store.dispose()
    if args.format == "json":
        text = json.dumps({"results": results, "deltas": deltas}, indent=2) + "\n"
    else:
        metric_keys: list[str] = []
        for r in results:
            for k, v in r["metrics"].items():
                if not isinstance(v, (list, dict)) and k not in metric_keys and k not in _EXPORT_COLUMNS:
                    metric_keys.append(k)
        delta_keys: list[str] = []
        for d in deltas:
            for k in d["delta"].get("differences", {}):
                if f"delta_{k}" not in delta_keys:
                    delta_keys.append(f"delta_{k}")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[*_EXPORT_COLUMNS, *metric_keys, *delta_keys], extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for r in results:
            row = {k: v for k, v in r.items() if k != "metrics"}
            row.update({k: v for k, v in r["metrics"].items() if k in metric_keys})
            row["kind"] = "result"
            row["rtdose_sop_instance_uids"] = " ".join(r["rtdose_sop_instance_uids"])
            writer.writerow(row)
        for d in deltas:
            row = {k: v for k, v in d.items() if k != "delta"}
            row.update({f"delta_{k}": v for k, v in d["delta"].get("differences", {}).items()})
            row["kind"] = "delta"
            row["reasons"] = "; ".join(d["reasons"])
            writer.writerow(row)
        text = buf.getvalue()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {len(results)} dose result(s) and {len(deltas)} delta(s) to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# -- model ------------------------------------------------------------------------------------------

def cmd_model(args: argparse.Namespace) -> int:
    from heartloop.contouring.registry import ModelRegistry
    from heartloop.service.contouring import enqueue_repredictions, models_dir

    settings = _settings(args)
    registry = ModelRegistry(models_dir(settings))
    if args.action == "rollback":
        if not args.version:
            print("model rollback needs a VERSION (see: heartloop model list)", file=sys.stderr)
            return 2
        known = {m.version for m in registry.list()}
        if args.version not in known:
            print(f"no model version {args.version!r}; known: {sorted(v for v in known if v)}", file=sys.stderr)
            return 2
        registry.rollback(args.version, reason=args.reason or "rollback from the command line")
        from heartloop.store import Store

        store = Store.from_settings(settings)
        n = enqueue_repredictions(store)
        store.dispose()
        print(f"model {args.version} is current again; {n} unreviewed case(s) queued for re-prediction")
        return 0
    current = registry.current()
    metas = registry.list()
    if args.json:
        print(json.dumps([{"version": m.version, "parent": m.parent, "created_at": m.created_at,
                           "n_train_cases": m.n_train_cases, "n_val_cases": m.n_val_cases, "val_dice": m.val_dice,
                           "current": current is not None and m.version == current.version} for m in metas], indent=2))
        return 0
    if not metas:
        print("no model yet: cases wait as NO_MODEL until corrections train the first one")
        return 0
    print(f"{'version':<8} {'parent':<8} {'train':>5} {'val':>4} {'val Dice':>8}  created (UTC)")
    for m in metas:
        mark = "  <- current" if current is not None and m.version == current.version else ""
        dice = f"{m.val_dice:.3f}" if m.val_dice is not None else "-"
        print(f"{m.version:<8} {m.parent or '-':<8} {m.n_train_cases:>5} {m.n_val_cases:>4} {dice:>8}  "
              f"{m.created_at}{mark}")
    return 0


# -- correct ----------------------------------------------------------------------------------------

def cmd_correct(args: argparse.Namespace) -> int:
    from heartloop.service.corrections import enqueue_finalise, import_clinical_structure, submit_correction
    from heartloop.service.lifecycle import load_case_volume
    from heartloop.service.outputs import mask_from_nifti
    from heartloop.store import Store

    settings = _settings(args)
    store = Store.from_settings(settings)
    try:
        if store.get_case(args.case) is None:
            print(f"no case {args.case} (see: heartloop cases)", file=sys.stderr)
            return 2
        if args.from_rtstruct:
            correction_id = import_clinical_structure(store, settings, args.case, corrected_by=args.by or "TPS")
            if correction_id is None:
                print(f"case {args.case}: no linked RTSTRUCT has a heart ROI "
                      f"({', '.join(settings.rtstruct.heart_roi_names)})", file=sys.stderr)
                return 2
        else:
            if not (args.foreground and args.background and args.by):
                print("correct needs --foreground, --background and --by (or --from-rtstruct)", file=sys.stderr)
                return 2
            ct = load_case_volume(store, args.case, settings)
            fg = mask_from_nifti(Path(args.foreground), ct).array
            bg = mask_from_nifti(Path(args.background), ct).array
            correction_id = submit_correction(store, settings, args.case, foreground=fg, background=bg,
                                              corrected_by=args.by, kind=args.kind)
            # As a save in the review UI: the running service sends the corrected structure and report.
            enqueue_finalise(store, args.case, correction_id)
    finally:
        store.dispose()
    print(f"case {args.case}: correction {correction_id} saved; the case is CORRECTED and the trainer will learn from it"
          + ("" if args.from_rtstruct else "; the service sends the corrected RTSTRUCT and dose report to the TPS"))
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
    sp.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                    help="how long to wait for each C-STORE response (default 60; a busy node fsyncs every slice)")
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

    sp = sub.add_parser("model", help="list model versions, or roll back to an earlier one",
                        description="The append-only model registry: 'list' shows every version with its "
                                    "validation Dice and which is current; 'rollback VERSION' makes an earlier "
                                    "version current (recorded, nothing deleted) and re-predicts unreviewed cases.")
    common(sp)
    sp.add_argument("action", choices=["list", "rollback"])
    sp.add_argument("version", nargs="?")
    sp.add_argument("--reason", help="why (kept in the registry's history)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_model)

    sp = sub.add_parser("correct", help="save a correction of a case's predicted heart (painted masks)",
                        description="Save a correction of a case's latest prediction: NIfTI masks on the CT grid "
                                    "(as `heartloop phantom` writes them) of painted foreground (heart the model "
                                    "missed) and background (non-heart it included). The case becomes CORRECTED "
                                    "and the continual trainer learns from it. --from-rtstruct instead imports the "
                                    "heart ROI of a clinical RTSTRUCT the TPS sent for the case, as a dense label.")
    common(sp)
    sp.add_argument("--case", type=int, required=True, metavar="N", help="case id (see: heartloop cases)")
    sp.add_argument("--foreground", metavar="FG.nii.gz", help="painted heart voxels")
    sp.add_argument("--background", metavar="BG.nii.gz", help="painted non-heart voxels")
    sp.add_argument("--by", metavar="NAME", help="who corrected")
    sp.add_argument("--kind", choices=["sparse", "dense"], default="sparse",
                    help="sparse: only painted voxels are labels (default); dense: the masks are the whole label")
    sp.add_argument("--from-rtstruct", action="store_true", help="import the clinical heart ROI of a linked RTSTRUCT")
    sp.set_defaults(func=cmd_correct)

    sp = sub.add_parser("config", help="validate the settings and print the effective values")
    common(sp)
    sp.set_defaults(func=cmd_config)

    dose = sub.add_parser("dose", help="dose on structures: metrics from files, export of stored results",
                          description="Dose on structures. 'stats' computes the metrics of an RTSTRUCT ROI on an "
                                      "RTDOSE from the files alone; 'export' writes every stored dose result and "
                                      "delta for research.")
    dose_sub = dose.add_subparsers(dest="dose_command", required=True, metavar="SUBCOMMAND")
    sp = dose_sub.add_parser(
        "stats", help="volume, mean/min/max, D2/D98, V5-V30 Gy of an RTSTRUCT ROI on an RTDOSE",
        description="Dose metrics of one RTSTRUCT ROI: its planar contours voxelised and sampled trilinearly in "
                    "the dose grid (pixels centred on the dose nodes, dose.contour_supersample sub-pixels per axis). Several --rtdose files follow "
                    "the case rule: one PLAN dose is used, or the BEAM doses of one plan are summed; anything "
                    "ambiguous, RELATIVE units or another frame of reference is refused (exit status 2).")
    sp.add_argument("--config", help="TOML settings file (dose.contour_supersample, dose.dvh_bin_gy, rtstruct.heart_roi_names)")
    sp.add_argument("--rtstruct", required=True, metavar="FILE", help="RT Structure Set file")
    sp.add_argument("--rtdose", required=True, action="append", metavar="FILE",
                    help="RT Dose file (repeat for the BEAM doses of one plan)")
    sp.add_argument("--rtplan", action="append", metavar="FILE",
                    help="RT Plan file, optional: checks that the BEAM doses cover every treatment beam")
    sp.add_argument("--roi", metavar="NAME",
                    help="ROI name (case-insensitive); default: the first of rtstruct.heart_roi_names present")
    sp.add_argument("--json", action="store_true", help="print one JSON object (volume_cc, mean_gy, ...)")
    sp.add_argument("--plot", metavar="PNG", help="write the cumulative DVH as a PNG")
    sp.set_defaults(func=cmd_dose_stats)

    sp = dose_sub.add_parser(
        "export", help="every stored dose result and delta as CSV or JSON",
        description="Write every dose result (one row per structure and computation) and every delta (corrected "
                    "minus predicted ...) stored for any case. Rows carry case ids, not patient identifiers.")
    common(sp)
    sp.add_argument("--format", choices=["csv", "json"], default="csv")
    sp.add_argument("--out", metavar="FILE", help="output file (default: standard output)")
    sp.set_defaults(func=cmd_dose_export)

    from heartloop.service.cli_users import register as register_user_commands

    register_user_commands(sub, common, _settings)
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
