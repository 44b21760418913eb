"""Two-stage inference: geometry, box override, uneven slices, version, localiser miss.

Random-init networks give garbage contours; these tests check that the output is well-formed and
tied to the right geometry. Small phantoms (128 rows, 40 slices) and a coarse organ grid keep it fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heartloop.contouring.inference import (
    Prediction,
    Predictor,
    add_margin,
    box_from_mm,
    plausible_component,
    settings_to_dict,
)
from heartloop.contouring.network import UNet3D
from heartloop.contouring.registry import ModelMeta, ModelRegistry
from heartloop.contouring.resample import AxisGrid, block_factors, resample_separable
from heartloop.contouring.settings import ContouringSettings
from heartloop.phantom import make_patient

SETTINGS = ContouringSettings(width=8, depth=2, organ_voxel_mm=(4.0, 4.0, 4.0), margin_mm=10.0, device="cpu")


class FixedLogits(UNet3D):
    """A 'network' returning a fixed logit map (for geometry tests that need a known answer)."""

    def __init__(self, logits: np.ndarray | float) -> None:
        super().__init__(width=8, depth=1, groups=8)
        self.fixed = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.fixed, float):
            return torch.full_like(x, self.fixed, dtype=torch.float32)
        assert tuple(x.shape[2:]) == self.fixed.shape
        return torch.as_tensor(self.fixed, dtype=torch.float32)[None, None]


def _random_predictor(seed: int = 0, version: str = "000007") -> Predictor:
    torch.manual_seed(seed)
    return Predictor(UNet3D.from_settings(SETTINGS), UNet3D.from_settings(SETTINGS), SETTINGS, version)


def _truth_box(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    where = np.nonzero(mask)
    return tuple((int(w.min()), int(w.max()) + 1) for w in where)


@pytest.fixture(scope="module")
def patient():
    return make_patient(3, rows=128, n_slices=40)


@pytest.fixture(scope="module")
def uneven_patient():
    return make_patient(4, rows=128, n_slices=40, uneven=True)


def test_random_model_output_is_well_formed(patient) -> None:
    prediction = _random_predictor().predict(patient.volume)
    assert isinstance(prediction, Prediction)
    assert prediction.mask.same_grid(patient.volume)
    assert prediction.mask.array.dtype == np.bool_
    assert prediction.model_version == "000007"
    if prediction.box is not None:
        assert prediction.probability is not None
        assert prediction.probability.array.dtype == np.float32
        full = prediction.probability_on_ct()
        assert full.same_grid(patient.volume)
        assert np.array_equal(full.array > 0.5, prediction.mask.array)
    else:
        assert prediction.reason


@pytest.mark.parametrize("uneven", [False, True])
def test_box_override_is_respected(patient, uneven_patient, uneven: bool) -> None:
    ct = (uneven_patient if uneven else patient).volume
    if uneven:
        assert not ct.is_uniform
    low = ct.voxel_to_patient(np.array([30.0, 40.0, 8.0]))
    high = ct.voxel_to_patient(np.array([90.0, 100.0, 30.0]))
    # An "everything is heart" organ network shows exactly where prediction was allowed.
    predictor = Predictor(FixedLogits(-20.0), FixedLogits(20.0), SETTINGS, "000001")
    prediction = predictor.predict(ct, box_mm=(low, high))
    assert prediction.box == ((8, 31), (40, 101), (30, 91))
    assert prediction.box_source == "reviewer"
    expected = np.zeros(ct.shape, dtype=bool)
    expected[8:31, 40:101, 30:91] = True
    assert np.array_equal(prediction.mask.array, expected)
    # The probability crop sits exactly on the box in patient space (uneven slices included).
    probability = prediction.probability
    assert probability is not None and probability.shape == (23, 61, 61)
    assert np.allclose(probability.slice_position(0), ct.slice_position(8) + np.asarray(ct.row_direction) * 30
                       * ct.pixel_spacing[1] + np.asarray(ct.column_direction) * 40 * ct.pixel_spacing[0])
    assert np.allclose(probability.slice_offsets, ct.slice_offsets[8:31] - ct.slice_offsets[8])


def test_random_organ_network_never_predicts_outside_the_box(patient) -> None:
    ct = patient.volume
    box_mm = (ct.voxel_to_patient(np.array([20.0, 20.0, 5.0])), ct.voxel_to_patient(np.array([70.0, 80.0, 25.0])))
    prediction = _random_predictor(1).predict(ct, box_mm=box_mm)
    (k0, k1), (j0, j1), (i0, i1) = prediction.box
    outside = prediction.mask.array.copy()
    outside[k0:k1, j0:j1, i0:i1] = False
    assert not outside.any()


def test_box_mm_outside_the_ct_is_refused(patient) -> None:
    far = np.array([1e4, 1e4, 1e4])
    with pytest.raises(ValueError):
        box_from_mm(patient.volume, (far, far + 10))


@pytest.mark.parametrize("uneven", [False, True])
def test_localiser_box_maps_back_to_ct_indices(patient, uneven_patient, uneven: bool) -> None:
    ct = (uneven_patient if uneven else patient).volume
    truth = (uneven_patient if uneven else patient).heart_mask
    factors = block_factors(ct, SETTINGS.localiser_voxel_mm)
    # A perfect localiser: positive logits on coarse voxels holding any heart.
    padded = [int(np.ceil(s / f) * f) for s, f in zip(ct.shape, factors)]
    grown = np.zeros(padded, dtype=bool)
    grown[: ct.shape[0], : ct.shape[1], : ct.shape[2]] = truth
    coarse = grown.reshape(padded[0] // factors[0], factors[0], padded[1] // factors[1], factors[1],
                           padded[2] // factors[2], factors[2]).any(axis=(1, 3, 5))
    predictor = Predictor(FixedLogits(np.where(coarse, 20.0, -20.0)), FixedLogits(20.0), SETTINGS, "000002")
    box = predictor.localise(ct)
    truth_box = _truth_box(truth)
    assert box is not None
    # The box holds the whole heart plus the margin, and no more than margin + one coarse block.
    with_margin = add_margin(ct, truth_box, SETTINGS.margin_mm)
    for (lo, hi), (mlo, mhi), f in zip(box, with_margin, factors):
        assert lo <= mlo and hi >= mhi
        assert mlo - lo < f and hi - mhi < f
    prediction = predictor.predict(ct)
    assert prediction.box == box and prediction.box_source == "localiser"
    assert prediction.mask.array[truth].all()


def test_margin_follows_uneven_slice_offsets(uneven_patient) -> None:
    ct = uneven_patient.volume
    box = ((15, 20), (50, 60), (50, 60))
    (k0, k1), _, _ = add_margin(ct, box, 7.0)
    offsets = ct.slice_offsets
    assert offsets[15] - offsets[k0] <= 7.0 + 1e-6 and (k0 == 0 or offsets[15] - offsets[k0 - 1] > 7.0)
    assert offsets[k1 - 1] - offsets[19] <= 7.0 + 1e-6 and (k1 == len(offsets) or offsets[k1] - offsets[19] > 7.0)


def test_organ_grid_round_trip_is_identity_for_smooth_data(uneven_patient) -> None:
    ct = uneven_patient.volume
    box = ((5, 35), (30, 90), (30, 90))
    k, j, i = np.meshgrid(*(np.arange(lo, hi, dtype=np.float64) for lo, hi in box), indexing="ij")
    # A field linear in patient mm: trilinear resampling there and back must reproduce it.
    mm = ct.voxel_to_patient(np.stack([i, j, k], axis=-1))
    field = (mm @ np.array([0.3, -0.2, 0.5])).astype(np.float32)
    grid = AxisGrid.for_crop(ct, box, (3.0, 3.0, 3.0))
    coarse = resample_separable(field, tuple(p - lo for p, (lo, _) in zip(grid.positions, box)))
    back = resample_separable(coarse, grid.ct_positions_in_grid(ct, box))
    # The far edges beyond the last grid point are extrapolated as constant: compare the interior.
    interior = tuple(slice(0, n - 4) for n in field.shape)
    assert np.allclose(back[interior], field[interior], atol=1e-2)


def _coarse_truth(ct, truth: np.ndarray) -> np.ndarray:
    """The heart on the localiser grid (coarse voxels holding any heart)."""
    factors = block_factors(ct, SETTINGS.localiser_voxel_mm)
    padded = [int(np.ceil(s / f) * f) for s, f in zip(ct.shape, factors)]
    grown = np.zeros(padded, dtype=bool)
    grown[: ct.shape[0], : ct.shape[1], : ct.shape[2]] = truth
    return grown.reshape(padded[0] // factors[0], factors[0], padded[1] // factors[1], factors[1],
                         padded[2] // factors[2], factors[2]).any(axis=(1, 3, 5))


def _fraction_inside(mask: np.ndarray, box) -> float:
    inside = mask[tuple(slice(lo, hi) for lo, hi in box)].sum()
    return float(inside) / float(mask.sum())


@pytest.mark.parametrize("seed", [3, 11, 12])
def test_localiser_miss_falls_back_to_the_heart_position_in_the_body(seed: int) -> None:
    patient = make_patient(seed, rows=128, n_slices=40)
    predictor = Predictor(FixedLogits(-20.0), FixedLogits(20.0), SETTINGS, "000003")
    prediction = predictor.predict(patient.volume)
    # A miss never gives an empty contour: a heart-sized box where hearts are, segmented.
    assert prediction.box is not None and not prediction.is_empty and not prediction.reason
    assert prediction.box_source == "localiser" and prediction.model_version == "000003"
    assert _fraction_inside(patient.heart_mask, prediction.box) > 0.9


def test_localiser_miss_on_a_ct_without_a_body_gives_empty_mask_with_reason(patient) -> None:
    air = patient.volume.with_array(np.full(patient.volume.shape, -1000, dtype=np.int16))
    prediction = Predictor(FixedLogits(-20.0), FixedLogits(20.0), SETTINGS, "000003").predict(air)
    assert prediction.box is None and prediction.probability is None
    assert prediction.is_empty and prediction.reason
    assert prediction.mask.same_grid(air)


def test_under_confident_localiser_uses_a_lower_threshold(patient) -> None:
    ct, truth = patient.volume, patient.heart_mask
    coarse = _coarse_truth(ct, truth)
    confident = Predictor(FixedLogits(np.where(coarse, 20.0, -20.0)), FixedLogits(20.0), SETTINGS, "1")
    unsure = Predictor(FixedLogits(np.where(coarse, -0.5, -20.0)), FixedLogits(20.0), SETTINGS, "1")  # p = 0.38
    assert unsure.localise(ct) == confident.localise(ct)


def test_a_speck_of_localiser_signal_gives_a_heart_sized_box_around_it(patient) -> None:
    ct, truth = patient.volume, patient.heart_mask
    coarse = _coarse_truth(ct, truth)
    centre = tuple(int(round(np.mean(w))) for w in np.nonzero(coarse))
    logits = np.full(coarse.shape, -20.0)
    logits[centre] = 20.0  # one coarse voxel: far smaller than a heart
    box = Predictor(FixedLogits(logits), FixedLogits(20.0), SETTINGS, "1").localise(ct)
    assert box is not None and _fraction_inside(truth, box) > 0.95


def test_plausible_component_rules() -> None:
    probability = np.zeros((20, 20, 20), dtype=np.float32)
    probability[5:10, 5:10, 5:10] = 0.9  # 125 voxels
    component, how = plausible_component(probability, voxel_ml=1.0)
    assert component is not None and component.sum() == 125 and how == ""
    probability[5:10, 5:10, 5:10] = 0.2  # under-confident: found at a lower threshold, and said so
    component, how = plausible_component(probability, voxel_ml=1.0)
    assert component is not None and component.sum() == 125 and "0.15" in how
    component, _ = plausible_component(probability, voxel_ml=0.01)  # 1.25 ml: not a heart
    assert component is None
    big = np.full((20, 20, 20), 0.6, dtype=np.float32)
    big[5:10, 5:10, 5:10] = 0.9  # a heart inside a too-big blob: split off at a higher threshold
    component, how = plausible_component(big, voxel_ml=1.0)
    assert component is not None and component.sum() == 125 and "0.7" in how
    component, how = plausible_component(np.full((20, 20, 20), 0.9, dtype=np.float32), voxel_ml=1.0)
    assert component is not None and component.all() and "kept" in how  # nothing splits it: keep it


def test_load_from_registry_round_trip(tmp_path, patient) -> None:
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(LookupError):
        Predictor.load(registry)
    original = _random_predictor(5, version="000001")
    version = registry.register(original.state_dicts(), ModelMeta(kind="localiser+organ",
                                                                  settings=settings_to_dict(SETTINGS)))
    registry.promote(version)
    loaded = Predictor.load(registry, runtime=SETTINGS)
    assert loaded.version == version
    assert loaded.settings.width == SETTINGS.width
    box_mm = (patient.volume.voxel_to_patient(np.array([30.0, 30.0, 10.0])),
              patient.volume.voxel_to_patient(np.array([80.0, 80.0, 30.0])))
    a = original.predict(patient.volume, box_mm=box_mm)
    b = loaded.predict(patient.volume, box_mm=box_mm)
    assert np.array_equal(a.mask.array, b.mask.array)
    assert b.model_version == version


def test_largest_component_keeps_only_the_biggest_island():
    from heartloop.contouring.inference import largest_component

    mask = np.zeros((10, 20, 20), dtype=bool)
    mask[2:8, 2:12, 2:12] = True  # the heart
    mask[1, 18, 18] = True  # a speck
    mask[8:10, 15:18, 15:18] = True  # a smaller island
    kept = largest_component(mask)
    assert kept.sum() == 6 * 10 * 10
    assert kept[2:8, 2:12, 2:12].all() and not kept[1, 18, 18] and not kept[8:10, 15:18, 15:18].any()
    assert not largest_component(np.zeros((3, 3, 3), dtype=bool)).any()
