"""After a power cut, rows of acknowledged instances may be gone while their fsynced files remain:
the next start re-indexes them, so the case still completes."""

from __future__ import annotations

from sqlalchemy import delete, select

from heartloop.phantom import make_patient, write_patient
from heartloop.store.models import Instance, Series
from tests.helpers.dcmtk import storescu
from tests.helpers.procs import free_port, wait_for
from tests.helpers.service import ASSEMBLED, running_service


def test_lost_rows_are_reindexed_after_unclean_stop(make_settings, tmp_path):
    settings = make_settings(node={"port": free_port()},
                             series={"stable_age_s": 0.5, "poll_interval_s": 0.2, "min_slices": 5},
                             limits={"min_free_disk_bytes": 1048576})
    patient = make_patient(41, rows=96, n_slices=20)
    cts = sorted(write_patient(patient, tmp_path / "tps").glob("CT_*.dcm"))
    with running_service(settings) as service:
        assert len(storescu(cts, service.scp.port).sent_ok) == 20
        wait_for(lambda: service.store.list_cases(ASSEMBLED), 15, what="assembled")
        store = service.store
        # The power cut: the last 6 commits never reached the disk; the files did (fsynced).
        with store.session() as s, s.begin():
            ids = list(s.scalars(select(Instance.id).order_by(Instance.id.desc()).limit(6)))
            s.execute(delete(Instance).where(Instance.id.in_(ids)))
            s.execute(delete(Series))
        assert store.counts()["instances"] == 14
        marker = store.files.root / ".running"
        assert marker.exists()
        marker_text = marker.read_text()
    # running_service stopped cleanly and removed the marker; put it back as a crash would leave it.
    (settings.storage_root / ".running").write_text(marker_text)
    with running_service(settings) as service:
        assert service.store.counts()["instances"] == 20
        wait_for(lambda: service.store.list_cases(ASSEMBLED), 15, what="assembled again")
    assert not (settings.storage_root / ".running").exists()
