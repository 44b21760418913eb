"""The append-only model registry: never loses or overwrites a version, survives crashes and
concurrent writers, and `current()` follows promotions and rollbacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from heartloop.contouring.registry import EventKind, ModelMeta, ModelRegistry

REPO_ROOT = Path(__file__).resolve().parents[2]


def _weights(seed: float) -> dict[str, torch.Tensor]:
    return {"organ.head.weight": torch.full((2, 3), seed), "localiser.head.weight": torch.arange(4.0) + seed}


def _meta(**overrides) -> ModelMeta:
    values = dict(kind="localiser+organ", n_train_cases=3, n_val_cases=1, val_dice=0.8, settings={"width": 16})
    values.update(overrides)
    return ModelMeta(**values)


def test_register_assigns_sequential_versions_and_round_trips(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    first = registry.register(_weights(1.0), _meta(val_dice=None, n_val_cases=0))
    second = registry.register(_weights(2.0), _meta(parent=first, val_dice=0.85))
    assert (first, second) == ("000001", "000002")
    assert [m.version for m in registry.list()] == ["000001", "000002"]
    stored = registry.load(second)
    assert stored.meta.parent == "000001" and stored.meta.val_dice == 0.85
    assert stored.meta.settings == {"width": 16}
    assert torch.equal(stored.weights["organ.head.weight"], torch.full((2, 3), 2.0))
    assert (tmp_path / "models" / "000002" / "weights.pt").is_file()
    assert json.loads((tmp_path / "models" / "000002" / "meta.json").read_text())["meta"]["version"] == "000002"


def test_registering_never_touches_earlier_versions(tmp_path):
    registry = ModelRegistry(tmp_path)
    first = registry.register(_weights(1.0), _meta())
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / first).iterdir()}
    for n in range(5):
        registry.register(_weights(float(n)), _meta())
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / first).iterdir()}
    assert before == after
    assert len(registry.list()) == 6


def test_meta_is_validated_and_version_is_the_registrys_to_assign(tmp_path):
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ValueError):
        registry.register(_weights(0.0), _meta(version="000009"))
    with pytest.raises(ValueError, match="parent"):
        registry.register(_weights(0.0), _meta(parent="000042"))
    with pytest.raises(ValueError):
        _meta(val_dice=1.5)
    with pytest.raises(ValueError):
        _meta(settings={"bad": object()})
    assert registry.list() == []


def test_a_crash_mid_write_leaves_nothing_visible_and_burns_no_existing_version(tmp_path):
    registry = ModelRegistry(tmp_path)
    registry.register(_weights(1.0), _meta())
    # Simulated crashes: (a) a version directory with truncated weights and no meta.json,
    # (b) a staging directory never renamed, (c) a directory whose weights were cut short.
    partial = tmp_path / "000002"
    partial.mkdir()
    (partial / "weights.pt").write_bytes(b"\x80\x02truncated")
    staging = tmp_path / ".staging" / "000003-deadbeef"
    staging.mkdir()
    (staging / "weights.pt").write_bytes(b"half")
    third = registry.register(_weights(3.0), _meta())
    assert third == "000003"  # the half-written 000002 is skipped, never overwritten
    assert (partial / "weights.pt").read_bytes() == b"\x80\x02truncated"
    with open(tmp_path / third / "weights.pt", "r+b") as handle:
        handle.truncate(10)
    assert [m.version for m in registry.list()] == ["000001"]
    with pytest.raises(KeyError):
        registry.load("000002")
    with pytest.raises(KeyError):
        registry.load(third)
    assert registry.register(_weights(4.0), _meta()) == "000004"


def test_corrupt_weights_are_refused_on_load(tmp_path):
    registry = ModelRegistry(tmp_path)
    version = registry.register(_weights(1.0), _meta())
    path = tmp_path / version / "weights.pt"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(KeyError, match="checksum"):
        registry.load(version)


def test_stale_staging_is_cleaned_up(tmp_path):
    registry = ModelRegistry(tmp_path)
    leftover = tmp_path / ".staging" / "000001-abc"
    leftover.mkdir()
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert registry.discard_stale_staging(older_than_s=3600) == 1
    assert not leftover.exists()


def test_promotion_rollback_and_history(tmp_path):
    registry = ModelRegistry(tmp_path)
    assert registry.current() is None  # cold start
    v1 = registry.register(_weights(1.0), _meta(val_dice=0.7))
    v2 = registry.register(_weights(2.0), _meta(parent=v1, val_dice=0.8))
    registry.promote(v1)
    registry.promote(v2, reason="val dice 0.80 > 0.70")
    assert registry.current().version == v2
    registry.rollback(v1, reason="physicist: v2 misses the apex")
    assert registry.current().version == v1
    # a second registry object (another process) sees the same current model, nothing is cached
    assert ModelRegistry(tmp_path).current().version == v1
    history = registry.history()
    assert [(e.kind, e.version) for e in history] == [
        (EventKind.PROMOTE, v1),
        (EventKind.PROMOTE, v2),
        (EventKind.ROLLBACK, v1),
    ]
    assert [e.sequence for e in history] == [1, 2, 3]
    assert history[2].reason.startswith("physicist")
    assert len(registry.list()) == 2  # a rollback deletes nothing
    with pytest.raises(KeyError):
        registry.rollback("000099")


def test_current_skips_an_event_whose_version_was_damaged(tmp_path):
    registry = ModelRegistry(tmp_path)
    v1 = registry.register(_weights(1.0), _meta())
    v2 = registry.register(_weights(2.0), _meta())
    registry.promote(v1)
    registry.promote(v2)
    (tmp_path / v2 / "meta.json").unlink()
    assert registry.current().version == v1


_WORKER = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from heartloop.contouring.registry import ModelMeta, ModelRegistry
    root, go, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    registry = ModelRegistry(root)
    (go.parent / f"ready-{tag}").touch()
    while not go.exists():
        time.sleep(0.005)
    for n in range(15):
        version = registry.register({"w": torch.full((64,), float(n))},
                                    ModelMeta(kind="organ", data_snapshot=f"{tag}-{n}"))
        registry.promote(version, reason=f"{tag}-{n}")
        print(version, flush=True)
    """
)


def test_two_processes_registering_at_once_never_collide(tmp_path):
    root = tmp_path / "models"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(go), tag], stdout=subprocess.PIPE, text=True, env=env)
        for tag in ("a", "b")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{tag}").exists() for tag in ("a", "b")):
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)
    go.touch()  # both are at the start line: they now register at the same time
    outputs = [w.communicate(timeout=60)[0].split() for w in workers]
    assert all(w.returncode == 0 for w in workers)
    versions = outputs[0] + outputs[1]
    assert len(versions) == 30 and len(set(versions)) == 30  # every registration got its own version
    registry = ModelRegistry(root)
    metas = registry.list()
    assert len(metas) == 30
    assert sorted(m.data_snapshot for m in metas) == sorted([f"a-{n}" for n in range(15)] + [f"b-{n}" for n in range(15)])
    for meta in metas:  # each version holds exactly what its writer registered
        n = int(meta.data_snapshot.split("-")[1])
        assert torch.equal(registry.load(meta.version).weights["w"], torch.full((64,), float(n)))
    history = registry.history()
    assert len(history) == 30 and [e.sequence for e in history] == list(range(1, 31))
