"""Hourly PM2.5 series of the UCI "Beijing PM2.5 Data" set, as windows for a forecaster.

Pipeline (:func:`load_splits` runs all of it):

1. :func:`load_pm25_csv` (or :func:`load_pm25_parquet` for the file written by
   ``data_prep/beijing_pm25.py``) checks the columns, the value ranges and the timestamps and
   returns a frame on a complete hourly ``DatetimeIndex``: hours absent from the file are inserted
   with every value missing. PM2.5 stays NaN wherever it was not measured (never imputed); the
   weather columns are forward-filled (inputs only) and the filled hours flagged in
   ``weather_filled``.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import numpy as np
import pandas as pd
import torch

from mmpo.errors import ConfigError, DataError

# ------------------------------------------------------------------------------------ layout

TIME_COLUMNS: tuple[str, ...] = ("year", "month", "day", "hour")
PM25 = "pm2.5"
WEATHER_NUMERIC: tuple[str, ...] = ("DEWP", "TEMP", "PRES", "Iws", "Is", "Ir")
WEATHER_COLUMNS: tuple[str, ...] = ("DEWP", "TEMP", "PRES", "cbwd", "Iws", "Is", "Ir")
#: Columns the CSV must have (``No``, the row number of the UCI file, is optional and ignored).
REQUIRED_COLUMNS: tuple[str, ...] = (*TIME_COLUMNS, PM25, *WEATHER_COLUMNS)
#: Columns the Parquet written by ``data_prep/beijing_pm25.py`` must have (``weather_filled`` optional).
PARQUET_COLUMNS: tuple[str, ...] = ("time", PM25, *WEATHER_COLUMNS)
#: Columns of the frame returned by the loaders (index: hourly ``DatetimeIndex`` named ``time``).
FRAME_COLUMNS: tuple[str, ...] = (PM25, *WEATHER_COLUMNS, "weather_filled")

#: Plausible range (inclusive) and unit of each numeric column.
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    PM25: (0.0, 1500.0),
    "DEWP": (-60.0, 40.0),
    "TEMP": (-50.0, 50.0),
    "PRES": (900.0, 1100.0),
    "Iws": (0.0, 1000.0),
    "Is": (0.0, 100.0),
    "Ir": (0.0, 100.0),
}
UNITS: dict[str, str] = {
    PM25: "µg/m³",
    "DEWP": "°C",
    "TEMP": "°C",
    "PRES": "hPa",
    "Iws": "m/s (cumulated wind speed)",
    "Is": "hours (cumulated hours of snow)",
    "Ir": "hours (cumulated hours of rain)",
}
#: Wind-direction codes of ``cbwd`` (``cv`` = calm and variable), in one-hot order.
CBWD_CODES: tuple[str, ...] = ("NE", "NW", "SE", "cv")

#: Continuous columns the :class:`Normalizer` standardises (``log1p_Iws`` = ``log1p(Iws)``).
NORM_COLUMNS: tuple[str, ...] = (PM25, "DEWP", "TEMP", "PRES", "log1p_Iws", "Is", "Ir")
STD_FLOOR = 1e-6
#: Covariates per hour, in the order of :func:`features` (F = 16).
FEATURE_NAMES: tuple[str, ...] = (
    "DEWP", "TEMP", "PRES", "log1p_Iws", "Is", "Ir",
    *(f"cbwd_{c}" for c in CBWD_CODES),
    "hour_sin", "hour_cos", "doy_sin", "doy_cos", "weekday_sin", "weekday_cos",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
ONE_HOUR = np.timedelta64(1, "h")

_Arr = TypeVar("_Arr")


# ------------------------------------------------------------------------------------ checks

def _hint(column: str, v: float) -> str:
    """Why a value may be out of range, in the user's terms (appended after an em dash)."""
    lo, hi = PLAUSIBLE_RANGES[column]
    if v <= -900:
        return " — a missing-value code? leave missing values empty"
    if column == PM25:
        if v > hi:
            return " — PM2.5 is expected in µg/m³; an error/sentinel code (e.g. 9999) must be left empty instead"
        return " — missing hours must be left empty, not coded as a negative number"
    if column in ("TEMP", "DEWP"):
        if v > 200:
            return " — Kelvin? (subtract 273.15)"
        if v > hi:
            return " — Fahrenheit? (convert with (F - 32) / 1.8)"
        return ""
    if column == "PRES":
        if 80 <= v <= 115:
            return " — kPa? (multiply by 10)"
        if 600 <= v < lo:
            return " — mmHg? (multiply by 1.333)"
        if v >= 80000:
            return " — Pa? (divide by 100)"
        return ""
    if v < lo:
        return " — it cannot be negative"
    if column == "Iws":
        return " — m/s expected (km/h or an error code?)"
    return " — cumulated hours expected (minutes or an error code?)"


def _check_columns(found: Iterable[str], required: Iterable[str], path: Path, layout: str) -> None:
    found = [str(c) for c in found]
    missing = [c for c in required if c not in found]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found {found} "
            f"(expected the {layout} layout: {', '.join(required)})"
        )


def _numeric(raw: pd.DataFrame, columns: Iterable[str], path: Path, where: Callable[[int], str]) -> pd.DataFrame:
    """``raw[columns]`` as float64; a non-empty value that is not a number -> DataError."""
    out = {}
    for c in columns:
        col = raw[c]
        num = pd.to_numeric(col, errors="coerce") if not pd.api.types.is_numeric_dtype(col) else col
        num = num.astype("float64")
        bad = np.flatnonzero(num.isna().to_numpy() & col.notna().to_numpy())
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{path}: column {c} must hold numbers; got {col.iloc[i]!r} on {where(i)} "
                f"({bad.size} non-numeric value(s); leave missing values empty)"
            )
        inf = np.flatnonzero(np.isinf(num.to_numpy()))
        if inf.size:
            i = int(inf[0])
            raise DataError(f"{path}: column {c} must be finite; got {num.iloc[i]} on {where(i)}")
        out[c] = num.to_numpy()
    return pd.DataFrame(out, index=raw.index)


def _check_ranges(num: pd.DataFrame, path: Path, where: Callable[[int], str]) -> None:
    for c, (lo, hi) in PLAUSIBLE_RANGES.items():
        v = num[c].to_numpy()
        bad = np.flatnonzero(~np.isnan(v) & ((v < lo) | (v > hi)))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{path}: {c} must be in {UNITS[c]}, within [{lo:g}, {hi:g}]; got {v[i]:g} on {where(i)}"
                f"{_hint(c, float(v[i]))} ({bad.size} value(s) out of range)"
            )


def _check_cbwd(raw: pd.Series, path: Path, where: Callable[[int], str]) -> pd.Series:
    s = raw.astype("object").where(raw.notna(), None)
    s = s.map(lambda x: x.strip() if isinstance(x, str) else x)
    s = s.where(s != "", None)
    bad = np.flatnonzero(s.notna().to_numpy() & ~s.isin(CBWD_CODES).to_numpy())
    if bad.size:
        i = int(bad[0])
        v = s.iloc[i]
        hint = ""
        matches = [c for c in CBWD_CODES if c.lower() == str(v).lower()]
        if matches:
            hint = f" — codes are case-sensitive: {matches[0]!r}?"
        raise DataError(
            f"{path}: cbwd must be one of {', '.join(CBWD_CODES)} (wind direction; cv = calm and variable); "
            f"got {v!r} on {where(i)}{hint} ({bad.size} row(s))"
        )
    return s


def _times_from_parts(raw: pd.DataFrame, path: Path, where: Callable[[int], str]) -> pd.DatetimeIndex:
    parts = _numeric(raw, TIME_COLUMNS, path, where)
    limits = {"year": (1900, 2200), "month": (1, 12), "day": (1, 31), "hour": (0, 23)}
    for c in TIME_COLUMNS:
        v = parts[c].to_numpy()
        lo, hi = limits[c]
        bad = np.flatnonzero(np.isnan(v) | (v != np.round(v)) | (v < lo) | (v > hi))
        if bad.size:
            i = int(bad[0])
            got = "an empty value" if np.isnan(v[i]) else f"{v[i]:g}"
            raise DataError(f"{path}: {c} must be a whole number in [{lo}, {hi}]; got {got} on {where(i)}")
    times = pd.to_datetime(parts.astype("int64"), errors="coerce")
    bad = np.flatnonzero(times.isna().to_numpy())
    if bad.size:
        i = int(bad[0])
        y, m, d, h = (int(parts[c].iloc[i]) for c in TIME_COLUMNS)
        raise DataError(f"{path}: year/month/day {y}-{m:02d}-{d:02d} (hour {h}) on {where(i)} is not a calendar date")
    return pd.DatetimeIndex(times).as_unit("s")


def _complete(
    values: pd.DataFrame, times: pd.DatetimeIndex, path: Path, where: Callable[[int], str],
    weather_filled: np.ndarray | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Checked columns + their timestamps -> the frame on a complete hourly index (module docstring)
    and ``inserted [T]`` bool (hours absent from the file). ``attrs``: ``source``,
    ``rows_in_file``, ``hours_inserted``."""
    if len(times) == 0:
        raise DataError(f"{path}: no rows")
    dup = times.duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup)
        first = times[rows[0]]
        same = rows[times[rows] == first]
        raise DataError(
            f"{path}: duplicate timestamp {first:%Y-%m-%d %H:00} on {where(int(same[0]))} and {where(int(same[1]))} "
            f"(each hour must appear once; {int(times[rows].nunique())} duplicated hour(s) in all)"
        )
    frame = values.copy()
    frame.index = times
    frame["weather_filled"] = False if weather_filled is None else weather_filled.astype(bool)
    frame = frame.sort_index()
    full = pd.date_range(frame.index[0], frame.index[-1], freq="h", unit="s", name="time")
    inserted = ~full.isin(frame.index)
    frame = frame.reindex(full)
    frame["weather_filled"] = frame["weather_filled"].fillna(True).astype(bool)
    gaps = frame[list(WEATHER_COLUMNS)].isna().any(axis=1).to_numpy()
    for c in WEATHER_COLUMNS:
        if frame[c].isna().all():
            raise DataError(f"{path}: column {c} has no values at all (weather columns feed the forecaster)")
    # Forward fill (inputs only); a gap at the very start has nothing before it: back-filled.
    frame[list(WEATHER_COLUMNS)] = frame[list(WEATHER_COLUMNS)].ffill().bfill()
    frame["weather_filled"] = frame["weather_filled"].to_numpy() | gaps
    frame = frame[list(FRAME_COLUMNS)]
    frame.attrs = {"source": str(path), "rows_in_file": int(len(values)), "hours_inserted": int(inserted.sum())}
    return frame, np.asarray(inserted, dtype=bool)


def _assemble(num: pd.DataFrame, cbwd: pd.Series) -> pd.DataFrame:
    out = pd.DataFrame({PM25: num[PM25].to_numpy()}, index=num.index)
    for c in WEATHER_COLUMNS:
        out[c] = cbwd.to_numpy(dtype=object) if c == "cbwd" else num[c].to_numpy()
    return out


def load_pm25_csv(path: str | Path) -> pd.DataFrame:
    """The UCI Beijing PM2.5 CSV -> hourly frame; see :func:`read_pm25_csv` (this is its frame)."""
    return read_pm25_csv(path)[0]


def read_pm25_csv(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The UCI Beijing PM2.5 CSV -> hourly frame ``[T, 9]`` (columns :data:`FRAME_COLUMNS`, float64
    except ``cbwd`` (str) and ``weather_filled`` (bool)), indexed by a complete hourly
    ``DatetimeIndex`` named ``time`` from the first to the last hour of the file.

    Absent hours are inserted (PM2.5 NaN, weather forward-filled, ``weather_filled`` True); PM2.5
    is never imputed. ``frame.attrs``: ``source``, ``rows_in_file``, ``hours_inserted``. Also returns
    ``inserted [T]`` bool: the hours absent from the file.
    Raises DataError for missing columns, non-numeric or implausible values (with the unit
    expected), bad dates and duplicate timestamps, naming the line (row index + 2).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = pd.read_csv(path, dtype=str, skipinitialspace=True, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable CSV file: {e}") from e
    raw.columns = [str(c).strip() for c in raw.columns]
    _check_columns(raw.columns, REQUIRED_COLUMNS, path, "UCI Beijing PM2.5 CSV")
    raw = raw.reset_index(drop=True)

    def where(i: int) -> str:
        return f"line {i + 2}"

    times = _times_from_parts(raw, path, where)
    num = _numeric(raw, (PM25, *WEATHER_NUMERIC), path, where)
    _check_ranges(num, path, where)
    cbwd = _check_cbwd(raw["cbwd"], path, where)
    return _complete(_assemble(num, cbwd), times, path, where)


def load_pm25_parquet(path: str | Path) -> pd.DataFrame:
    """The ``series.parquet`` written by ``data_prep/beijing_pm25.py`` -> the same frame as
    :func:`load_pm25_csv` (same checks; errors name the 0-based row). ``weather_filled`` is read
    back (OR-ed with any gap filled now)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    _check_columns(raw.columns, PARQUET_COLUMNS, path, "data_prep/beijing_pm25.py series.parquet")
    raw = raw.reset_index(drop=True)

    def where(i: int) -> str:
        return f"row {i}"

    t = raw["time"]
    if not pd.api.types.is_datetime64_any_dtype(t) or getattr(t.dt, "tz", None) is not None:
        raise DataError(f"{path}: column time must hold naive local timestamps (Beijing time); got dtype {t.dtype}")
    times = pd.DatetimeIndex(t).as_unit("s")
    bad = np.flatnonzero(times.isna() | (times != times.floor("h")))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: column time must hold whole hours; got {times[i]} on {where(i)}")
    num = _numeric(raw, (PM25, *WEATHER_NUMERIC), path, where)
    _check_ranges(num, path, where)
    cbwd = _check_cbwd(raw["cbwd"], path, where)
    filled = raw["weather_filled"].fillna(False).to_numpy(dtype=bool) if "weather_filled" in raw else None
    return _complete(_assemble(num, cbwd), times, path, where, weather_filled=filled)[0]


def load_pm25(path: str | Path) -> pd.DataFrame:
    """:func:`load_pm25_csv` or :func:`load_pm25_parquet` by suffix (``.csv``; ``.parquet`` / ``.pq``);
    a folder written by ``data_prep/beijing_pm25.py`` reads its ``series.parquet``."""
    path = Path(path)
    if path.is_dir():
        path = path / "series.parquet"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_pm25_csv(path)
    if suffix in (".parquet", ".pq"):
        return load_pm25_parquet(path)
    raise DataError(f"{path}: unknown file type {path.suffix!r}; expected the UCI .csv or the .parquet of data_prep/beijing_pm25.py")


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
    def fit(cls, df: pd.DataFrame) -> "Normalizer":
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
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalizer":
        """Inverse of :meth:`to_dict`; ConfigError if a column or a statistic is missing or not a number."""
        if not isinstance(d, Mapping) or not isinstance(d.get("mean"), Mapping) or not isinstance(d.get("std"), Mapping):
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


def check_year_sets(train_years: Iterable[int], val_years: Iterable[int], test_years: Iterable[int]) -> dict[str, list[int]]:
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
        for b in SPLITS[i + 1:]:
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
    present = sorted(set(int(y) for y in np.unique(year)))
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
        raise DataError(f"covariate {FEATURE_NAMES[c]} is not finite at {idx[r]} (weather must be filled first: use the loaders)")
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
        if self.target.shape != (T,) or self.mask.shape != (T,) or self.covariates.shape != (T, len(self.feature_names)):
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
        raise ValueError(f"make_windows: starts must lie in [{window}, {T - horizon}] (window {window}, horizon {horizon}, T {T})")
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
        "future_cov": torch.from_numpy(np.ascontiguousarray(series.covariates[fut_idx].reshape(len(starts), horizon, F))),
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
) -> tuple[dict[str, PM25Series], Normalizer]:
    """Load (CSV or Parquet by suffix, see :func:`load_pm25`), split by year, fit the normalizer
    on the training split only, and build ``{"train", "val", "test"}`` series."""
    sets = check_year_sets(train_years, val_years, test_years)  # before reading 40k rows
    frames = split_by_time(load_pm25(path), sets["train"], sets["val"], sets["test"])
    normalizer = Normalizer.fit(frames["train"])
    return {name: build_series(f, normalizer) for name, f in frames.items()}, normalizer
