"""Hourly PM2.5 series of the UCI "Beijing PM2.5 Data" set, as windows for a forecaster.

Pipeline (:func:`load_splits` runs all of it):

1. :func:`load_pm25_csv` (or :func:`load_pm25_parquet` for the file written by
   ``data_prep/beijing_pm25.py``; both in :mod:`mmpo_tasks.forecasting.pm25_file`, re-exported
   here) checks the columns, the value ranges and the timestamps and returns a frame on a complete
   hourly ``DatetimeIndex``: hours absent from the file are inserted with every value missing.
   PM2.5 stays NaN wherever it was not measured (never imputed); the weather columns are
   forward-filled (inputs only) and the filled hours flagged in ``weather_filled``.
2. :func:`split_by_time` cuts it by calendar year (train 2010-2012, validation 2013, test 2014 by
   default); :class:`Normalizer` is fitted on the training rows only.
3. :func:`build_series` turns a split into a :class:`PM25Series` (normalized target, observed
   mask, covariates ``[T, F]``); :func:`valid_starts` and :func:`make_windows` cut it into
   ``(past window, forecast horizon)`` pairs for training and evaluation.

Errors caused by the file raise :class:`~mmpo.errors.DataError` naming the file, the column and
the first offending line (line in the CSV = row index + 2) and value; bad split settings raise
:class:`~mmpo.errors.ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from mmpo.data_rows import KeyCheck, LoadSummary
from mmpo.errors import ConfigError, DataError
from mmpo_tasks.forecasting.pm25_file import (  # the file layout and its reader (re-exported)
    CBWD_CODES,
    FRAME_COLUMNS,
    ONE_HOUR,
    PARQUET_COLUMNS,
    PLAUSIBLE_RANGES,
    PM25,
    REQUIRED_COLUMNS,
    TIME_COLUMNS,
    UNITS,
    WEATHER_COLUMNS,
    WEATHER_NUMERIC,
    load_pm25,
    load_pm25_csv,
    load_pm25_parquet,
    read_pm25_csv,
)

# ------------------------------------------------------------------------------------ layout

#: Continuous columns the :class:`Normalizer` standardises (``log1p_Iws`` = ``log1p(Iws)``).
NORM_COLUMNS: tuple[str, ...] = (PM25, "DEWP", "TEMP", "PRES", "log1p_Iws", "Is", "Ir")
STD_FLOOR = 1e-6
#: Covariates per hour, in the order of :func:`features` (F = 16).
FEATURE_NAMES: tuple[str, ...] = (
    "DEWP",
    "TEMP",
    "PRES",
    "log1p_Iws",
    "Is",
    "Ir",
    *(f"cbwd_{c}" for c in CBWD_CODES),
    "hour_sin",
    "hour_cos",
    "doy_sin",
    "doy_cos",
    "weekday_sin",
    "weekday_cos",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")

_Arr = TypeVar("_Arr")


# ------------------------------------------------------------------------------- normalizer


def _continuous(df: pd.DataFrame) -> pd.DataFrame:
    """The :data:`NORM_COLUMNS` of ``df`` (``log1p_Iws`` computed), float64 ``[T, 7]``."""
    out = pd.DataFrame({c: df[c].to_numpy(dtype="float64") for c in (PM25, "DEWP", "TEMP", "PRES")}, index=df.index)
    out["log1p_Iws"] = np.log1p(df["Iws"].to_numpy(dtype="float64"))
    out["Is"] = df["Is"].to_numpy(dtype="float64")
    out["Ir"] = df["Ir"].to_numpy(dtype="float64")
    return out[list(NORM_COLUMNS)]


@dataclass
class Normalizer:
    """Per-column standardisation ``(x - mean) / std`` of :data:`NORM_COLUMNS`.

    Fit on the training rows only. Means and standard deviations ignore NaN (pandas ``mean`` /
    ``std``, ddof=1); the weather statistics also leave out rows whose weather was forward-filled
    (``weather_filled``), since those are not measurements. ``std`` is floored at 1e-6.
    """

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def fit(cls, df: pd.DataFrame) -> Normalizer:
        """Statistics of the rows of ``df`` (a frame of the loaders, or a split of one)."""
        cont = _continuous(df)
        measured = ~df["weather_filled"].to_numpy(dtype=bool) if "weather_filled" in df else np.ones(len(df), bool)
        mean, std = {}, {}
        for c in NORM_COLUMNS:
            col = cont[c] if c == PM25 else cont[c][measured]
            m, s = col.mean(), col.std()
            if not np.isfinite(m):
                raise DataError(f"cannot fit the normalizer: column {c} has no values in the {len(df)} training row(s)")
            mean[c] = float(m)
            std[c] = float(max(s, STD_FLOOR)) if np.isfinite(s) else STD_FLOOR
        return cls(mean, std)

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """``df`` -> normalized :data:`NORM_COLUMNS` ``[T, 7]`` float64, NaN kept."""
        cont = _continuous(df)
        for c in NORM_COLUMNS:
            cont[c] = (cont[c] - self.mean[c]) / self.std[c]
        return cont

    def normalize_pm25(self, x: _Arr) -> _Arr:
        """PM2.5 in µg/m³ -> normalized units (float, numpy array or torch tensor, any shape)."""
        return (x - self.mean[PM25]) / self.std[PM25]  # type: ignore[operator]

    def inverse_pm25(self, x: _Arr) -> _Arr:
        """Normalized PM2.5 -> µg/m³ (float, numpy array or torch tensor, any shape)."""
        return x * self.std[PM25] + self.mean[PM25]  # type: ignore[operator]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: ``{"columns", "mean", "std", "std_floor"}``."""
        return {"columns": list(NORM_COLUMNS), "mean": dict(self.mean), "std": dict(self.std), "std_floor": STD_FLOOR}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalizer:
        """Inverse of :meth:`to_dict`; ConfigError if a column or a statistic is missing or not a number."""
        if (
            not isinstance(d, Mapping)
            or not isinstance(d.get("mean"), Mapping)
            or not isinstance(d.get("std"), Mapping)
        ):
            raise ConfigError(f"normalizer: expected a mapping with 'mean' and 'std' mappings, got {d!r:.200}")
        mean, std = {}, {}
        for key, src, dst in (("mean", d["mean"], mean), ("std", d["std"], std)):
            for c in NORM_COLUMNS:
                v = src.get(c)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ConfigError(f"normalizer.{key}.{c}: expected a finite number, got {v!r}")
                dst[c] = float(v)
            if key == "std" and any(v <= 0 for v in dst.values()):
                raise ConfigError(f"normalizer.std: every std must be > 0, got {dst}")
        return cls(mean, std)


# ------------------------------------------------------------------------------------ splits


@dataclass(frozen=True)
class SplitConfig:
    """Calendar-year split (defaults: train 2010-2012, validation 2013, test 2014)."""

    train_years: tuple[int, ...] = (2010, 2011, 2012)
    val_years: tuple[int, ...] = (2013,)
    test_years: tuple[int, ...] = (2014,)

    def check(self) -> None:
        """ConfigError if a set is empty, holds a non-integer or shares a year with another."""
        check_year_sets(self.train_years, self.val_years, self.test_years)


def check_year_sets(
    train_years: Iterable[int], val_years: Iterable[int], test_years: Iterable[int]
) -> dict[str, list[int]]:
    """``{"train": [...], "val": [...], "test": [...]}`` sorted; ConfigError if a set is empty,
    holds something other than an integer year or overlaps another set."""
    sets: dict[str, list[int]] = {}
    for name, years in zip(SPLITS, (train_years, val_years, test_years)):
        key = f"{name}_years"
        if isinstance(years, (str, bytes, int)):
            years = [years]  # type: ignore[list-item]
        ys = list(years)
        if not ys:
            raise ConfigError(f"{key}: empty; give at least one calendar year")
        for y in ys:
            if isinstance(y, bool) or not isinstance(y, (int, np.integer)):
                raise ConfigError(f"{key}: years must be integers, got {y!r}")
        sets[name] = sorted({int(y) for y in ys})
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            both = sorted(set(sets[a]) & set(sets[b]))
            if both:
                raise ConfigError(
                    f"{a}_years {sets[a]} and {b}_years {sets[b]} overlap in {both}: "
                    f"each year may belong to one split only (remove it from one of them)"
                )
    return sets


def split_by_time(
    df: pd.DataFrame,
    train_years: Iterable[int] = SplitConfig.train_years,
    val_years: Iterable[int] = SplitConfig.val_years,
    test_years: Iterable[int] = SplitConfig.test_years,
) -> dict[str, pd.DataFrame]:
    """``{"train", "val", "test"}`` -> the rows of ``df`` whose calendar year is in that set.

    ConfigError if the sets overlap (or are empty), or a year has no rows in ``df``."""
    sets = check_year_sets(train_years, val_years, test_years)
    year = df.index.year
    present = sorted({int(y) for y in np.unique(year)})
    out = {}
    for name, ys in sets.items():
        absent = [y for y in ys if y not in present]
        if absent:
            raise ConfigError(f"{name}_years: {absent} not in the data (years present: {present})")
        out[name] = df[np.isin(year, ys)]
    return out


# ---------------------------------------------------------------------------------- features


def features(df: pd.DataFrame, normalizer: Normalizer) -> tuple[np.ndarray, list[str]]:
    """Covariates ``[T, F=16]`` float32 and their names (:data:`FEATURE_NAMES`).

    Normalized DEWP, TEMP, PRES, log1p(Iws), Is, Ir (6); one-hot cbwd NE/NW/SE/cv (4); sin/cos of
    hour of day (period 24), of day of year (``(doy - 1 + hour / 24) / days in that year``) and of
    weekday (period 7) (6). ``df`` must have its weather filled (the loaders do it)."""
    norm = normalizer.transform(df)
    cols = [norm[c].to_numpy() for c in ("DEWP", "TEMP", "PRES", "log1p_Iws", "Is", "Ir")]
    cbwd = df["cbwd"].to_numpy(dtype=object)
    cols += [(cbwd == c).astype("float64") for c in CBWD_CODES]
    idx = pd.DatetimeIndex(df.index)
    hour = idx.hour.to_numpy(dtype="float64")
    doy = (idx.day_of_year.to_numpy(dtype="float64") - 1 + hour / 24) / np.where(idx.is_leap_year, 366.0, 365.0)
    wd = idx.day_of_week.to_numpy(dtype="float64")
    for phase in (hour / 24, doy, wd / 7):
        cols += [np.sin(2 * np.pi * phase), np.cos(2 * np.pi * phase)]
    x = np.stack(cols, axis=1).astype(np.float32) if len(df) else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    if not np.isfinite(x).all():
        r, c = np.argwhere(~np.isfinite(x))[0]
        raise DataError(
            f"covariate {FEATURE_NAMES[c]} is not finite at {idx[r]} (weather must be filled first: use the loaders)"
        )
    return x, list(FEATURE_NAMES)


@dataclass
class PM25Series:
    """One split as arrays over its ``T`` hours.

    - ``times`` ``[T]`` ``datetime64[h]`` (hourly; a gap only between non-adjacent split years)
    - ``target`` ``[T]`` float32: normalized PM2.5, NaN where not measured
    - ``mask`` ``[T]`` bool: PM2.5 measured
    - ``covariates`` ``[T, F]`` float32 (:func:`features`), ``feature_names`` ``[F]``
    - ``normalizer``: the training split's :class:`Normalizer`
    """

    times: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    covariates: np.ndarray
    feature_names: list[str]
    normalizer: Normalizer
    weather_filled: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [T] bool (optional)

    def __post_init__(self) -> None:
        T = len(self.times)
        if self.weather_filled.size == 0 and T:
            self.weather_filled = np.zeros(T, bool)
        if (
            self.target.shape != (T,)
            or self.mask.shape != (T,)
            or self.covariates.shape != (T, len(self.feature_names))
        ):
            raise ValueError(
                f"PM25Series: shapes disagree: times {self.times.shape}, target {self.target.shape}, "
                f"mask {self.mask.shape}, covariates {self.covariates.shape}, {len(self.feature_names)} feature names"
            )

    def __len__(self) -> int:
        return len(self.times)

    @property
    def num_features(self) -> int:
        return self.covariates.shape[1]


def build_series(df: pd.DataFrame, normalizer: Normalizer) -> PM25Series:
    """A loader frame (or a split of one) -> :class:`PM25Series` (see there for shapes)."""
    cov, names = features(df, normalizer)
    target = normalizer.transform(df)[PM25].to_numpy().astype(np.float32)
    return PM25Series(
        times=pd.DatetimeIndex(df.index).to_numpy().astype("datetime64[h]"),
        target=target,
        mask=~np.isnan(target),
        covariates=cov,
        feature_names=names,
        normalizer=normalizer,
        weather_filled=df["weather_filled"].to_numpy(dtype=bool) if "weather_filled" in df else np.zeros(len(df), bool),
    )


# ----------------------------------------------------------------------------------- windows


def _check_window(window: int, horizon: int) -> None:
    for name, v in (("window", window), ("horizon", horizon)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{name}: expected a whole number of hours >= 1, got {v!r}")


def valid_starts(
    series: PM25Series, window: int, horizon: int, min_observed_frac: float = 0.75, stride: int = 1
) -> np.ndarray:
    """Forecast starts ``t`` ``[N]`` int64 (index of the first forecast hour), ascending.

    ``t`` qualifies when ``t - window >= 0``, ``t + horizon <= T``, the hours
    ``[t - window, t + horizon)`` are consecutive in time, at least ``min_observed_frac`` of the
    input window ``[t - window, t)`` has PM2.5 observed (``observed >= ceil(frac * window)``) and
    at least one target hour in ``[t, t + horizon)`` is observed. ``stride`` thins the candidate
    grid ``window, window + stride, ...`` before the checks (so starts stay on a fixed grid).
    """
    _check_window(window, horizon)
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ConfigError(f"stride: expected a whole number >= 1, got {stride!r}")
    if not 0.0 <= float(min_observed_frac) <= 1.0:
        raise ConfigError(f"min_observed_frac: expected a fraction in [0, 1], got {min_observed_frac!r}")
    T = len(series)
    t = np.arange(window, T - horizon + 1, stride, dtype=np.int64)
    if t.size == 0:
        return t
    cs = np.concatenate([[0], np.cumsum(series.mask, dtype=np.int64)])
    need = math.ceil(float(min_observed_frac) * window - 1e-9)
    observed_in = cs[t] - cs[t - window]
    observed_out = cs[t + horizon] - cs[t]
    # gap[i] = 1 when hour i does not follow hour i-1 directly; a window may hold none past its first hour.
    gap = np.zeros(T + 1, np.int64)
    gap[2:] = np.cumsum(np.diff(series.times) != ONE_HOUR)
    contiguous = gap[t + horizon] - gap[t - window + 1] == 0
    return t[(observed_in >= need) & (observed_out >= 1) & contiguous]


def make_windows(series: PM25Series, starts: np.ndarray, window: int, horizon: int) -> dict[str, torch.Tensor]:
    """Cut ``(input window, forecast horizon)`` pairs at ``starts [N]`` (from :func:`valid_starts`).

    - ``past [N, W, 2 + F]`` float32: channel 0 = normalized PM2.5, a missing hour holding the
      last observed value earlier in the window (0.0, the training mean, if none); channel 1 =
      observed mask (1.0 / 0.0); channels 2: = the hour's covariates
    - ``future_cov [N, H, F]`` float32: covariates of the forecast hours (known, like a weather forecast)
    - ``target [N, H]`` float32: normalized PM2.5, exactly 0.0 where missing (never a filled value)
    - ``target_mask [N, H]`` bool: target observed; losses and rewards must use it
    - ``start [N]`` int64
    """
    _check_window(window, horizon)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    T, F = len(series), series.num_features
    if starts.size and (starts.min() < window or starts.max() + horizon > T):
        raise ValueError(
            f"make_windows: starts must lie in [{window}, {T - horizon}] (window {window}, horizon {horizon}, T {T})"
        )
    target0 = np.where(series.mask, series.target, 0.0).astype(np.float32)  # [T], no NaN
    past_idx = starts[:, None] + np.arange(-window, 0)[None, :]  # [N, W]
    fut_idx = starts[:, None] + np.arange(horizon)[None, :]  # [N, H]
    pm, obs = target0[past_idx], series.mask[past_idx]
    last = np.maximum.accumulate(np.where(obs, np.arange(window)[None, :], -1), axis=1)  # last observed position
    filled = np.where(last >= 0, np.take_along_axis(pm, np.maximum(last, 0), axis=1), 0.0).astype(np.float32)
    past = np.concatenate([filled[..., None], obs[..., None].astype(np.float32), series.covariates[past_idx]], axis=-1)
    tmask = series.mask[fut_idx]
    return {
        "past": torch.from_numpy(np.ascontiguousarray(past.reshape(len(starts), window, 2 + F), dtype=np.float32)),
        "future_cov": torch.from_numpy(
            np.ascontiguousarray(series.covariates[fut_idx].reshape(len(starts), horizon, F))
        ),
        "target": torch.from_numpy(np.where(tmask, target0[fut_idx], 0.0).astype(np.float32)),
        "target_mask": torch.from_numpy(tmask.astype(bool)),
        "start": torch.from_numpy(starts.copy()),
    }


# ---------------------------------------------------------------------------------- pipeline


def load_splits(
    path: str | Path,
    *,
    train_years: Iterable[int] = SplitConfig.train_years,
    val_years: Iterable[int] = SplitConfig.val_years,
    test_years: Iterable[int] = SplitConfig.test_years,
    unknown_keys: str | KeyCheck = "error",
    summary: LoadSummary | None = None,
) -> tuple[dict[str, PM25Series], Normalizer]:
    """Load (CSV or Parquet by suffix, see :func:`load_pm25`), split by year, fit the normalizer
    on the training split only, and build ``{"train", "val", "test"}`` series. ``unknown_keys``:
    what a Parquet column not in the layout does; ``summary``, when given, gets the hours per
    split, the validation and test hours held out, the hours of years in no split (skipped) and
    notes on inserted and unmeasured hours and ignored CSV columns."""
    sets = check_year_sets(train_years, val_years, test_years)  # before reading 40k rows
    full = load_pm25(path, unknown_keys=unknown_keys)
    frames = split_by_time(full, sets["train"], sets["val"], sets["test"])
    normalizer = Normalizer.fit(frames["train"])
    if summary is not None:
        _summarize(summary, full, frames, sets)
    return {name: build_series(f, normalizer) for name, f in frames.items()}, normalizer


def _summarize(
    summary: LoadSummary, full: pd.DataFrame, frames: dict[str, pd.DataFrame], sets: dict[str, list[int]]
) -> None:
    summary.unit = "hours"
    summary.splits = {name: len(f) for name, f in frames.items()}
    summary.held_out = len(frames["val"]) + len(frames["test"])
    summary.held_out_why = f"by calendar year: val_years {sets['val']}, test_years {sets['test']}"
    outside = len(full) - sum(len(f) for f in frames.values())
    if outside:
        summary.skip("year in no split", outside)
    inserted = int(full.attrs.get("hours_inserted", 0))
    if inserted:
        summary.notes.append(f"{inserted} hours absent from the file inserted (PM2.5 missing, weather carried)")
    summary.notes.append(f"PM2.5 unmeasured in {int(full[PM25].isna().sum())} hours (never imputed)")
    if full.attrs.get("ignored_columns"):
        summary.notes.append(f"CSV columns ignored: {', '.join(full.attrs['ignored_columns'])}")


__all__ = [
    "CBWD_CODES",
    "FEATURE_NAMES",
    "FRAME_COLUMNS",
    "NORM_COLUMNS",
    "ONE_HOUR",
    "PARQUET_COLUMNS",
    "PLAUSIBLE_RANGES",
    "PM25",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "STD_FLOOR",
    "TIME_COLUMNS",
    "UNITS",
    "WEATHER_COLUMNS",
    "WEATHER_NUMERIC",
    "Normalizer",
    "PM25Series",
    "SplitConfig",
    "build_series",
    "check_year_sets",
    "features",
    "load_pm25",
    "load_pm25_csv",
    "load_pm25_parquet",
    "load_splits",
    "make_windows",
    "read_pm25_csv",
    "split_by_time",
    "valid_starts",
]
