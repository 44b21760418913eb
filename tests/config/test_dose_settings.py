"""The [dose] section and rtstruct.corrected_roi_name: defaults, overrides, clear refusals."""

from __future__ import annotations

import pytest

from heartloop.config import ConfigError, load_settings


def test_dose_defaults_and_environment(tmp_path):
    s = load_settings(environ={"HEARTLOOP_STORAGE__ROOT": str(tmp_path)})
    assert (s.dose.supersample, s.dose.delta_mean_gy, s.dose.dvh_bin_gy) == (3, 0.5, 0.1)
    assert s.rtstruct.corrected_roi_name == "Heart"
    s = load_settings(environ={"HEARTLOOP_STORAGE__ROOT": str(tmp_path), "HEARTLOOP_DOSE__DELTA_MEAN_GY": "0.2",
                               "HEARTLOOP_DOSE__SUPERSAMPLE": "5", "HEARTLOOP_RTSTRUCT__CORRECTED_ROI_NAME": "Heart"})
    assert (s.dose.delta_mean_gy, s.dose.supersample) == (0.2, 5)


@pytest.mark.parametrize("section, values, key", [
    ("dose", {"supersample": 0}, "dose.supersample"),
    ("dose", {"delta_mean_gy": -1}, "dose.delta_mean_gy"),
    ("dose", {"dvh_bin_gy": 0}, "dose.dvh_bin_gy"),
    ("dose", {"delta_mean": 0.5}, "dose.delta_mean"),
    ("rtstruct", {"corrected_roi_name": "A_very_long_heart_name"}, "rtstruct.corrected_roi_name"),
])
def test_bad_dose_settings_name_the_key(tmp_path, section, values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(environ={}, overrides={"storage": {"root": str(tmp_path)}, section: values})
