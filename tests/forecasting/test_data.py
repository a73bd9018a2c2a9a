"""PM2.5 forecasting data: the real UCI Beijing CSV, missing-hour masking on small constructed
files, window selection, user-facing errors and the data_prep round trip."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mmpo.errors import ConfigError, DataError
from mmpo_tasks.forecasting.data import (
    CBWD_CODES,
    FEATURE_NAMES,
    NORM_COLUMNS,
    REQUIRED_COLUMNS,
    Normalizer,
    PM25Series,
    build_series,
    load_pm25,
    load_pm25_csv,
    load_splits,
    make_windows,
    read_pm25_csv,
    split_by_time,
    valid_starts,
)

ROOT = Path(__file__).resolve().parents[2]
# the copy bundled with the task (see its README for the source): part of the repository
REAL_CSV = ROOT / "tasks" / "forecasting" / "data_sources" / "beijing_pm25.csv"
HEADER = ["No", "year", "month", "day", "hour", "pm2.5", "DEWP", "TEMP", "PRES", "cbwd", "Iws", "Is", "Ir"]


def _cli():
    return runpy.run_path(str(ROOT / "data_prep" / "beijing_pm25.py"))["main"]


# ------------------------------------------------------------------------- constructed files


def _rows(hours: int, start: str = "2010-01-01 00:00") -> list[dict[str, Any]]:
    """``hours`` plausible hourly rows in the UCI layout; pm2.5 = 10 + t so values are traceable."""
    out = []
    for t, ts in enumerate(pd.date_range(start, periods=hours, freq="h")):
        out.append(
            {
                "No": t + 1,
                "year": ts.year,
                "month": ts.month,
                "day": ts.day,
                "hour": ts.hour,
                "pm2.5": float(10 + t),
                "DEWP": -5 + t % 7,
                "TEMP": 2.0 + t % 5,
                "PRES": 1020.0 - t % 3,
                "cbwd": CBWD_CODES[t % 4],
                "Iws": 1.79 * (t % 4 + 1),
                "Is": 0,
                "Ir": t % 2,
            }
        )
    return out


def _write(path: Path, rows: list[dict[str, Any]], header: list[str] = HEADER) -> Path:
    lines = [",".join(header)]
    for r in rows:
        lines.append(",".join("" if r.get(c) is None else str(r.get(c)) for c in header))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


DROPPED = (10, 11, 12, 50)  # hours absent from the small file
BLANK = (20, 21, 40)  # hours present with pm2.5 empty
MISSING = sorted(DROPPED + BLANK)


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    """Four days (96 hours) of 2010; hours DROPPED absent, pm2.5 of hours BLANK empty."""
    rows = _rows(96)
    for t in BLANK:
        rows[t]["pm2.5"] = None
    return _write(tmp_path / "small.csv", [r for t, r in enumerate(rows) if t not in DROPPED])


# ------------------------------------------------------------------------------ the real CSV


@pytest.fixture(scope="module")
def real() -> dict[str, Any]:
    frame, inserted = read_pm25_csv(REAL_CSV)
    series, norm = load_splits(REAL_CSV, train_years=[2010, 2011, 2012], val_years=[2013], test_years=[2014])
    return {"frame": frame, "inserted": inserted, "series": series, "norm": norm, "raw": pd.read_csv(REAL_CSV)}


def test_real_csv_counts(real: dict[str, Any]) -> None:
    frame, series = real["frame"], real["series"]
    assert len(frame) == 43_824 and not real["inserted"].any() and frame.attrs["hours_inserted"] == 0
    assert frame.index[0] == pd.Timestamp("2010-01-01 00:00") and frame.index[-1] == pd.Timestamp("2014-12-31 23:00")
    assert (np.diff(frame.index.to_numpy()) == np.timedelta64(1, "h")).all()
    assert int(frame["pm2.5"].isna().sum()) == 2_067 and not frame["weather_filled"].any()
    # 2010 and 2011: 8,760 h; 2012 is a leap year: 8,784 h -> 26,304; 2013 and 2014: 8,760 h each.
    assert {k: len(s) for k, s in series.items()} == {"train": 26_304, "val": 8_760, "test": 8_760}
    assert {k: int((~s.mask).sum()) for k, s in series.items()} == {"train": 1_886, "val": 82, "test": 99}
    assert all(np.isnan(s.target[~s.mask]).all() and np.isfinite(s.target[s.mask]).all() for s in series.values())
    assert series["val"].times[0] == np.datetime64("2013-01-01T00", "h")
    for s in series.values():
        assert s.covariates.dtype == np.float32 and s.covariates.shape == (len(s), len(FEATURE_NAMES)) == (len(s), 16)
        assert np.isfinite(s.covariates).all() and s.feature_names == list(FEATURE_NAMES)
        assert (s.covariates[:, 6:10].sum(1) == 1).all()  # one wind direction per hour


def test_real_normalizer_is_pandas_mean_std_of_training_years(real: dict[str, Any]) -> None:
    raw, norm = real["raw"], real["norm"]
    train = raw[raw["year"].between(2010, 2012)]
    assert len(train) == 26_304
    expected = {c: train[c] for c in ("pm2.5", "DEWP", "TEMP", "PRES", "Is", "Ir")}
    expected["log1p_Iws"] = np.log1p(train["Iws"])
    assert set(norm.mean) == set(NORM_COLUMNS) == set(expected)
    for c, col in expected.items():
        assert norm.mean[c] == pytest.approx(col.mean(), rel=1e-12, abs=1e-12), c
        assert norm.std[c] == pytest.approx(col.std(), rel=1e-12), c
    assert norm.mean["pm2.5"] == pytest.approx(97.8234, abs=1e-4) and norm.std["pm2.5"] == pytest.approx(
        89.2493, abs=1e-4
    )
    s = real["series"]["train"]
    assert np.allclose(norm.inverse_pm25(s.target[s.mask]), train["pm2.5"].dropna().to_numpy(), atol=1e-3)
    # on the training hours the standardised target has mean 0, std 1
    assert abs(float(np.nanmean(s.target))) < 1e-5 and abs(float(np.nanstd(s.target, ddof=1)) - 1) < 1e-5


def test_normalizer_uses_training_rows_only(real: dict[str, Any], tmp_path: Path) -> None:
    frame = real["frame"].copy()
    is2014 = frame.index.year == 2014
    frame.loc[is2014, "pm2.5"] = 1400.0
    frame.loc[is2014, "TEMP"] = frame.loc[is2014, "TEMP"] + 20
    frame.loc[is2014, "Iws"] = 900.0
    changed = Normalizer.fit(split_by_time(frame)["train"])
    assert changed.to_dict() == real["norm"].to_dict()

    raw = real["raw"].copy()
    raw.loc[raw["year"] == 2014, "pm2.5"] = 1400.0
    raw.loc[raw["year"] == 2014, "PRES"] = 950.0
    path = tmp_path / "changed.csv"
    raw.to_csv(path, index=False)
    series, norm = load_splits(path, train_years=[2010, 2011, 2012], val_years=[2013], test_years=[2014])
    assert norm.to_dict() == real["norm"].to_dict()
    assert np.array_equal(series["train"].covariates, real["series"]["train"].covariates)
    assert not np.array_equal(series["test"].covariates, real["series"]["test"].covariates)
    # a different training set does move the statistics
    assert Normalizer.fit(split_by_time(frame, [2010, 2011], [2013], [2014])["train"]).mean != real["norm"].mean


def test_normalizer_dict_round_trip_and_inverse() -> None:
    frame = pd.DataFrame(
        {
            "pm2.5": [10.0, np.nan, 30.0],
            "DEWP": [-1.0, 0.0, 1.0],
            "TEMP": [5.0, 5.0, 5.0],
            "PRES": [1010.0, 1011.0, 1012.0],
            "Iws": [0.0, 1.0, 3.0],
            "Is": [0.0, 0.0, 0.0],
            "Ir": [0.0, 1.0, 2.0],
            "weather_filled": [False] * 3,
        },
        index=pd.date_range("2010-01-01", periods=3, freq="h"),
    )
    norm = Normalizer.fit(frame)
    assert norm.mean["pm2.5"] == 20.0 and norm.std["pm2.5"] == pytest.approx(math.sqrt(200))  # NaN ignored
    assert norm.std["TEMP"] == 1e-6 and norm.std["Is"] == 1e-6  # constant columns: the floor
    back = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert back == norm
    x = np.array([0.0, 35.0, 75.0, 500.0])
    assert np.allclose(norm.inverse_pm25(norm.normalize_pm25(x)), x)
    bad = norm.to_dict()
    del bad["std"]["TEMP"]
    with pytest.raises(ConfigError, match=r"normalizer\.std\.TEMP"):
        Normalizer.from_dict(bad)


# --------------------------------------------------------------------- missing-hour masking


def test_absent_hours_are_inserted_and_masked(small_csv: Path) -> None:
    frame, inserted = read_pm25_csv(small_csv)
    assert len(frame) == 96 and frame.attrs["hours_inserted"] == len(DROPPED) and frame.attrs["rows_in_file"] == 92
    assert np.flatnonzero(inserted).tolist() == list(DROPPED)
    assert np.flatnonzero(frame["pm2.5"].isna().to_numpy()).tolist() == MISSING  # never imputed
    assert np.flatnonzero(frame["weather_filled"].to_numpy()).tolist() == list(DROPPED)
    # weather forward-filled from the last hour in the file
    assert (
        frame["TEMP"].iloc[10:13].tolist() == [frame["TEMP"].iloc[9]] * 3
        and frame["cbwd"].iloc[50] == frame["cbwd"].iloc[49]
    )

    norm = Normalizer.fit(frame)
    s = build_series(frame, norm)
    assert s.times.dtype == np.dtype("datetime64[h]") and len(s) == 96
    assert np.flatnonzero(~s.mask).tolist() == MISSING and np.isnan(s.target[MISSING]).all()
    observed = [t for t in range(96) if t not in MISSING]
    assert np.allclose(norm.inverse_pm25(s.target[observed]), [10.0 + t for t in observed], atol=1e-4)
    assert norm.mean["pm2.5"] == pytest.approx(np.mean([10.0 + t for t in observed]))


def test_make_windows_masks_missing_targets_and_fills_inputs(small_csv: Path) -> None:
    frame = load_pm25_csv(small_csv)
    s = build_series(frame, Normalizer.fit(frame))
    W, H, F = 8, 6, len(FEATURE_NAMES)
    starts = np.array([8, 16, 19, 36, 46, 90])
    w = make_windows(s, starts, W, H)
    assert w["past"].shape == (6, W, 2 + F) and w["future_cov"].shape == (6, H, F)
    assert w["target"].shape == w["target_mask"].shape == (6, H) and w["start"].tolist() == starts.tolist()
    assert w["target_mask"].dtype.is_floating_point is False and str(w["start"].dtype) == "torch.int64"
    past, target, tmask = w["past"].numpy(), w["target"].numpy(), w["target_mask"].numpy()
    assert np.isfinite(past).all() and np.isfinite(target).all() and np.isfinite(w["future_cov"].numpy()).all()

    for i, t in enumerate(starts):
        hours = np.arange(t, t + H)
        assert tmask[i].tolist() == [h not in MISSING for h in hours]
        assert (target[i][~tmask[i]] == 0.0).all()  # missing targets: exactly 0.0 and masked
        assert np.array_equal(target[i][tmask[i]], s.target[hours][tmask[i]])
        assert np.array_equal(w["future_cov"].numpy()[i], s.covariates[t : t + H])
        assert np.array_equal(past[i, :, 2:], s.covariates[t - W : t])
        assert past[i, :, 1].tolist() == [float(h not in MISSING) for h in range(t - W, t)]
    assert tmask[0].tolist() == [True, True, False, False, False, True]  # hours 8..13; 10-12 absent

    # window 8..15 (start 16): hours 10, 11, 12 hold the value of hour 9, the last observed one
    v9 = s.target[9]
    assert past[1, :, 0].tolist() == pytest.approx(
        [s.target[8], v9, v9, v9, v9, s.target[13], s.target[14], s.target[15]]
    )
    # window 11..18 (start 19): 11 and 12 come before any observed hour in the window -> 0.0 (training mean)
    assert past[2, :2, 0].tolist() == [0.0, 0.0] and past[2, 2, 0] == pytest.approx(s.target[13])
    # window 38..45 (start 46): hour 40 blank -> hour 39's value
    assert past[4, 2, 0] == pytest.approx(s.target[39]) and past[4, 2, 1] == 0.0
    # window 42..49, targets 46..51 (hour 50 absent)
    assert tmask[4].tolist() == [True, True, True, True, False, True]

    empty = make_windows(s, np.array([], dtype=np.int64), W, H)
    assert empty["past"].shape == (0, W, 2 + F) and empty["target"].shape == (0, H)
    with pytest.raises(ValueError, match="starts must lie in"):
        make_windows(s, np.array([3]), W, H)


# --------------------------------------------------------------------------------- valid_starts


def _series(mask: list[bool] | np.ndarray, times: np.ndarray | None = None) -> PM25Series:
    mask = np.asarray(mask, dtype=bool)
    T = len(mask)
    if times is None:
        times = np.datetime64("2010-01-01T00", "h") + np.arange(T).astype("timedelta64[h]")
    return PM25Series(
        times=times,
        target=np.where(mask, 0.5, np.nan).astype(np.float32),
        mask=mask,
        covariates=np.zeros((T, len(FEATURE_NAMES)), np.float32),
        feature_names=list(FEATURE_NAMES),
        normalizer=Normalizer({c: 0.0 for c in NORM_COLUMNS}, {c: 1.0 for c in NORM_COLUMNS}),
    )


def _brute(mask: np.ndarray, window: int, horizon: int, frac: float, stride: int = 1) -> list[int]:
    return [
        t
        for t in range(window, len(mask) - horizon + 1, stride)
        if mask[t - window : t].sum() >= frac * window - 1e-9 and mask[t : t + horizon].any()
    ]


def test_valid_starts_boundaries() -> None:
    #        0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
    mask = [1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1]
    s = _series(mask)
    # window 4, horizon 2, 3 of 4 inputs must be observed (75 %)
    got = valid_starts(s, 4, 2, 0.75).tolist()
    assert got == [4, 5, 11, 12, 13, 14]
    assert 5 in got  # targets 5, 6: one observed target is enough
    assert 6 not in got  # inputs 2..5 = 1,0,1,1 -> 75 % but targets 6, 7 both missing
    assert 10 not in got  # inputs 6..9 = 0,0,1,1 -> 50 %
    assert 7 not in got  # inputs 3..6 = 0,1,1,0 -> 50 % (target 8 observed)
    assert valid_starts(s, 4, 2, 0.76).tolist() == [12]  # 3/4 < 0.76: only 4 of 4 (inputs 8..11)
    assert valid_starts(s, 4, 2, 1.0).tolist() == [12]
    assert valid_starts(s, 4, 2, 0.5).tolist() == [4, 5, 7, 8, 9, 10, 11, 12, 13, 14]  # 6 still out: no target
    assert valid_starts(s, 4, 2, 0.0).tolist() == _brute(np.array(mask, bool), 4, 2, 0.0)
    assert valid_starts(s, 4, 2, 0.75, stride=3).tolist() == [4, 13]  # grid 4, 7, 10, 13
    assert valid_starts(s, 15, 2, 0.0).tolist() == []  # no room: t + horizon > T

    # ceil(0.7 * 10) = 7 exactly (0.7 * 10 is 7.000000000000001 in floating point)
    s10 = _series([1] * 7 + [0] * 3 + [1])
    assert valid_starts(s10, 10, 1, 0.7).tolist() == [10]
    assert valid_starts(s10, 10, 1, 0.71).tolist() == []

    rng = np.random.default_rng(0)
    m = rng.random(500) < 0.7
    for window, horizon, frac, stride in ((24, 6, 0.75, 1), (7, 3, 0.3, 2), (12, 12, 1.0, 5)):
        assert valid_starts(_series(m), window, horizon, frac, stride).tolist() == _brute(
            m, window, horizon, frac, stride
        )

    with pytest.raises(ConfigError, match="min_observed_frac"):
        valid_starts(s, 4, 2, 1.5)
    with pytest.raises(ConfigError, match="window"):
        valid_starts(s, 0, 2)


def test_valid_starts_do_not_span_a_gap_between_years() -> None:
    # hours 0..9, then a jump of one day: a window must not join the two stretches
    times = np.datetime64("2010-01-01T00", "h") + np.r_[np.arange(10), 34 + np.arange(10)].astype("timedelta64[h]")
    s = _series([True] * 20, times)
    assert valid_starts(s, 3, 2, 1.0).tolist() == [3, 4, 5, 6, 7, 8, 13, 14, 15, 16, 17, 18]


# ------------------------------------------------------------------------------------- errors


def test_wrong_columns(tmp_path: Path) -> None:
    header = [c if c != "pm2.5" else "pm25" for c in HEADER if c != "TEMP"]
    rows = [{("pm25" if k == "pm2.5" else k): v for k, v in r.items()} for r in _rows(3)]
    path = _write(tmp_path / "cols.csv", rows, header)
    with pytest.raises(DataError) as e:
        load_pm25_csv(path)
    msg = str(e.value)
    assert (
        str(path) in msg
        and "missing column(s) ['pm2.5', 'TEMP']" in msg
        and "found ['No', 'year'" in msg
        and "'pm25'" in msg
    )
    assert set(REQUIRED_COLUMNS) <= set(HEADER)


@pytest.mark.parametrize(
    ("column", "row", "value", "expected"),
    [
        ("TEMP", 3, 271.3, ["TEMP must be in °C", "got 271.3 on line 5", "Kelvin"]),
        ("pm2.5", 6, 2300.0, ["pm2.5 must be in µg/m³", "[0, 1500]", "got 2300 on line 8"]),
        ("pm2.5", 1, -999, ["pm2.5", "got -999 on line 3", "leave missing values empty"]),
        ("PRES", 0, 101.3, ["PRES must be in hPa", "got 101.3 on line 2", "kPa"]),
        ("DEWP", 2, 75, ["DEWP must be in °C", "got 75 on line 4", "Fahrenheit"]),
        ("Iws", 4, -1.0, ["Iws", "got -1 on line 6", "cannot be negative"]),
    ],
)
def test_implausible_values(tmp_path: Path, column: str, row: int, value: float, expected: list[str]) -> None:
    rows = _rows(10)
    rows[row][column] = value
    rows[row + 2][column] = value  # the first offending line is reported, with the count
    path = _write(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as e:
        load_pm25_csv(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "2 value(s) out of range" in msg
    for part in expected:
        assert part in msg, (part, msg)


def test_other_bad_cells(tmp_path: Path) -> None:
    rows = _rows(6)
    rows[2]["TEMP"] = "warm"
    with pytest.raises(DataError, match=r"column TEMP must hold numbers; got 'warm' on line 4"):
        load_pm25_csv(_write(tmp_path / "a.csv", rows))
    rows = _rows(6)
    rows[4]["cbwd"] = "CV"
    with pytest.raises(DataError, match=r"cbwd must be one of NE, NW, SE, cv .*got 'CV' on line 6 .*'cv'\?"):
        load_pm25_csv(_write(tmp_path / "b.csv", rows))
    rows = _rows(6)
    rows[1].update(month=2, day=30)
    with pytest.raises(DataError, match=r"2010-02-30 \(hour 1\) on line 3 is not a calendar date"):
        load_pm25_csv(_write(tmp_path / "c.csv", rows))
    with pytest.raises(DataError, match="file not found"):
        load_pm25_csv(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'"):
        load_splits(tmp_path / "x.txt")


def test_duplicate_timestamp(tmp_path: Path) -> None:
    rows = _rows(8)
    rows.insert(5, dict(rows[3], No=99, **{"pm2.5": 1.0}))  # 03:00 again on line 7
    path = _write(tmp_path / "dup.csv", rows)
    with pytest.raises(DataError) as e:
        load_pm25_csv(path)
    msg = str(e.value)
    assert str(path) in msg and "duplicate timestamp 2010-01-01 03:00 on line 5 and line 7" in msg and "once" in msg


def test_overlapping_years(small_csv: Path) -> None:
    frame = load_pm25_csv(small_csv)
    with pytest.raises(ConfigError) as e:
        split_by_time(frame, [2010, 2011, 2012], [2012, 2013], [2014])
    assert "train_years [2010, 2011, 2012] and val_years [2012, 2013] overlap in [2012]" in str(e.value)
    with pytest.raises(ConfigError, match=r"val_years \[2013\] and test_years \[2013, 2014\] overlap in \[2013\]"):
        load_splits(REAL_CSV, train_years=[2010], val_years=[2013], test_years=[2013, 2014])
    with pytest.raises(ConfigError, match=r"test_years: \[2015\] not in the data \(years present: \[2010"):
        load_splits(REAL_CSV, train_years=[2010], val_years=[2013], test_years=[2015])
    with pytest.raises(ConfigError, match="val_years: empty"):
        split_by_time(frame, [2010], [], [2014])


# --------------------------------------------------------------------------- data_prep CLI


def _assert_same(a: dict[str, PM25Series], b: dict[str, PM25Series]) -> None:
    assert list(a) == list(b) == ["train", "val", "test"]
    for k, x in a.items():
        y = b[k]
        assert np.array_equal(x.times, y.times), k
        assert np.array_equal(x.target, y.target, equal_nan=True), k
        assert np.array_equal(x.mask, y.mask), k
        assert np.array_equal(x.covariates, y.covariates), k
        assert np.array_equal(x.weather_filled, y.weather_filled), k
        assert x.feature_names == y.feature_names and x.normalizer == y.normalizer


def test_cli_round_trip(real: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = _cli()
    out = tmp_path / "pm25"
    assert main(["--csv", str(REAL_CSV), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["series.parquet", "stats.json"]
    assert not list(tmp_path.glob("*.tmp-*"))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["split_years"] == {"train": [2010, 2011, 2012], "val": [2013], "test": [2014]}
    assert {k: v["hours"] for k, v in stats["splits"].items()} == {"train": 26_304, "val": 8_760, "test": 8_760}
    assert {k: v["pm25_missing_hours"] for k, v in stats["splits"].items()} == {"train": 1_886, "val": 82, "test": 99}
    assert stats["total"]["hours"] == 43_824 and stats["total"]["hours_inserted"] == 0
    assert stats["total"]["pm25_missing_hours"] == 2_067
    assert Normalizer.from_dict(stats["normalizer"]) == real["norm"]
    table = pd.read_parquet(out / "series.parquet")
    assert list(table.columns) == ["time", "pm2.5", "DEWP", "TEMP", "PRES", "cbwd", "Iws", "Is", "Ir", "weather_filled"]
    assert len(table) == 43_824 and int(table["pm2.5"].isna().sum()) == 2_067

    years = {"train_years": [2010, 2011, 2012], "val_years": [2013], "test_years": [2014]}
    series, norm = load_splits(out / "series.parquet", **years)
    assert norm == real["norm"]
    _assert_same(series, real["series"])
    _assert_same(load_splits(out, **years)[0], real["series"])  # the folder reads its series.parquet

    capsys.readouterr()
    assert main(["--csv", str(REAL_CSV), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: folder exists and is not empty") and "--overwrite" in err
    assert (out / "stats.json").is_file()  # refused, untouched


def test_cli_round_trip_with_absent_hours(real: dict[str, Any], tmp_path: Path) -> None:
    raw = real["raw"]
    drop = ((raw["year"] == 2011) & (raw["month"] == 3) & (raw["day"] == 1) & (raw["hour"] < 6)) | (
        (raw["year"] == 2013) & (raw["month"] == 7) & (raw["day"] == 4)
    )
    path = tmp_path / "gaps.csv"
    raw[~drop].to_csv(path, index=False)
    out = tmp_path / "pm25"
    main = _cli()
    assert (
        main(
            [
                "--csv",
                str(path),
                "--out",
                str(out),
                "--train-years",
                "2010",
                "2011",
                "2012",
                "--val-years",
                "2013",
                "--test-years",
                "2014",
            ]
        )
        == 0
    )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in_file"] == 43_824 - 30 and stats["total"]["hours"] == 43_824
    assert {k: v["hours_inserted"] for k, v in stats["splits"].items()} == {"train": 6, "val": 24, "test": 0}
    assert {k: v["weather_filled_hours"] for k, v in stats["splits"].items()} == {"train": 6, "val": 24, "test": 0}
    direct, _ = load_splits(path)
    via, _ = load_splits(out / "series.parquet")
    _assert_same(via, direct)
    assert direct["val"].weather_filled.sum() == 24 and (~direct["val"].mask).sum() == 82 + int(
        raw[drop & (raw["year"] == 2013)]["pm2.5"].notna().sum()
    )

    # --overwrite replaces the folder; a bad CSV exits 2 with `error: ...`
    assert main(["--csv", str(REAL_CSV), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "stats.json").read_text())["total"]["hours_inserted"] == 0
    bad = raw.copy()
    bad.loc[4, "TEMP"] = 271.3
    bad.to_csv(tmp_path / "kelvin.csv", index=False)
    assert main(["--csv", str(tmp_path / "kelvin.csv"), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_parquet_is_checked_like_the_csv(small_csv: Path, tmp_path: Path) -> None:
    table = load_pm25_csv(small_csv).reset_index()
    good = tmp_path / "series.parquet"
    table.to_parquet(good, index=False)
    back = load_pm25(good)
    assert back["weather_filled"].tolist() == [t in DROPPED for t in range(96)]
    assert np.array_equal(back["pm2.5"].to_numpy(), table["pm2.5"].to_numpy(), equal_nan=True)
    hot = table.copy()
    hot.loc[7, "TEMP"] = 300.0
    hot.to_parquet(tmp_path / "hot.parquet", index=False)
    with pytest.raises(DataError, match=r"hot\.parquet: TEMP must be in °C.*got 300 on row 7 — Kelvin"):
        load_pm25(tmp_path / "hot.parquet")
    table.drop(columns=["cbwd"]).to_parquet(tmp_path / "nocbwd.parquet", index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['cbwd'\]"):
        load_pm25(tmp_path / "nocbwd.parquet")
