"""`ContouringSettings`: valid whenever it exists."""

from __future__ import annotations

import pytest

from heartloop.contouring.settings import ContouringSettings


def test_defaults_are_valid_and_fit_the_network():
    settings = ContouringSettings()
    multiple = 2**settings.depth
    assert all(s % multiple == 0 for s in settings.organ_patch_size + settings.localiser_patch_size)
    assert settings.width % settings.groupnorm_groups == 0
    assert settings.epochs_without_progress_restart == 60


@pytest.mark.parametrize(
    "bad",
    [
        dict(width=12, groupnorm_groups=8),
        dict(organ_patch_size=(48, 60, 64)),
        dict(device="gpu"),
        dict(precision="fp16"),
        dict(replay_min_weight=0.0),
        dict(accepted_voxel_weight=2.0),
        dict(organ_voxel_mm=(2.0, 2.0)),
    ],
)
def test_settings_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        ContouringSettings(**bad)
