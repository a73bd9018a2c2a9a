"""Reading and checking the UCI "Beijing PM2.5 Data" file (the CSV, or the Parquet written by
``data_prep/beijing_pm25.py``): the first step of :mod:`mmpo_tasks.forecasting.data`'s pipeline.

:func:`load_pm25_csv` (or :func:`load_pm25_parquet`) checks the columns, the value ranges and the
timestamps and returns a frame on a complete hourly ``DatetimeIndex``: hours absent from the file
are inserted with every value missing. PM2.5 stays NaN wherever it was not measured (never
imputed); the weather columns are forward-filled (inputs only) and the filled hours flagged in
``weather_filled``. Errors raise :class:`~mmpo.errors.DataError` naming the file, the column and
the first offending line (line in the CSV = row index + 2) and value.

Columns: the UCI CSV is an external, fixed layout and every column the loader reads is required,
so a misspelled column is reported as missing (with the closest column found); the CSV's other
columns (its row number ``No``, an exported index, ...) are ignored and listed in
``frame.attrs["ignored_columns"]``. The Parquet is this project's own layout: a column other than
:data:`PARQUET_COLUMNS` and ``weather_filled`` is an unknown key (``task.unknown_keys``,
:mod:`mmpo.data_rows`), since a misspelled optional ``weather_filled`` would be silently lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from mmpo.core.registry import did_you_mean
from mmpo.data_rows import KeyCheck
from mmpo.errors import DataError

# ------------------------------------------------------------------------------------ layout

TIME_COLUMNS: tuple[str, ...] = ("year", "month", "day", "hour")
PM25 = "pm2.5"
WEATHER_NUMERIC: tuple[str, ...] = ("DEWP", "TEMP", "PRES", "Iws", "Is", "Ir")
WEATHER_COLUMNS: tuple[str, ...] = ("DEWP", "TEMP", "PRES", "cbwd", "Iws", "Is", "Ir")
#: Columns the CSV must have (``No``, the row number of the UCI file, is optional and ignored).
REQUIRED_COLUMNS: tuple[str, ...] = (*TIME_COLUMNS, PM25, *WEATHER_COLUMNS)
#: Columns the Parquet written by ``data_prep/beijing_pm25.py`` must have (``weather_filled`` optional).
PARQUET_COLUMNS: tuple[str, ...] = ("time", PM25, *WEATHER_COLUMNS)
PARQUET_OPTIONAL: tuple[str, ...] = ("weather_filled",)
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
ONE_HOUR = np.timedelta64(1, "h")


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
    """DataError when a required column is missing, with the closest column found that is not required."""
    found = [str(c) for c in found]
    required = list(required)
    missing = [c for c in required if c not in found]
    if missing:
        spare = [c for c in found if c not in required]
        hints = "".join(did_you_mean(c, spare).replace("Did you mean", f"For '{c}', did you mean") for c in missing)
        raise DataError(
            f"{path}: missing column(s) {missing}; found {found} (expected the {layout} layout: "
            f"{', '.join(required)}).{hints}"
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
    values: pd.DataFrame,
    times: pd.DatetimeIndex,
    path: Path,
    where: Callable[[int], str],
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
    frame.attrs = {"source": str(path), "rows_in_file": len(values), "hours_inserted": int(inserted.sum())}
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
    ignored = [c for c in raw.columns if c not in REQUIRED_COLUMNS and c != "No"]
    raw = raw.reset_index(drop=True)

    def where(i: int) -> str:
        return f"line {i + 2}"

    times = _times_from_parts(raw, path, where)
    num = _numeric(raw, (PM25, *WEATHER_NUMERIC), path, where)
    _check_ranges(num, path, where)
    cbwd = _check_cbwd(raw["cbwd"], path, where)
    frame, inserted = _complete(_assemble(num, cbwd), times, path, where)
    frame.attrs["ignored_columns"] = ignored
    return frame, inserted


def load_pm25_parquet(path: str | Path, *, unknown_keys: str | KeyCheck = "error") -> pd.DataFrame:
    """The ``series.parquet`` written by ``data_prep/beijing_pm25.py`` -> the same frame as
    :func:`load_pm25_csv` (same checks; errors name the 0-based row). ``weather_filled`` is read
    back (OR-ed with any gap filled now). A column not in the layout is an unknown key
    (``unknown_keys``: error | warn | ignore)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    _check_columns(raw.columns, PARQUET_COLUMNS, path, "data_prep/beijing_pm25.py series.parquet")
    KeyCheck.of(unknown_keys).check(
        dict.fromkeys(map(str, raw.columns)),
        (*PARQUET_COLUMNS, *PARQUET_OPTIONAL),
        path,
        "columns",
        layout="data_prep/beijing_pm25.py series.parquet",
        noun="column",
    )
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


def load_pm25(path: str | Path, *, unknown_keys: str | KeyCheck = "error") -> pd.DataFrame:
    """:func:`load_pm25_csv` or :func:`load_pm25_parquet` by suffix (``.csv``; ``.parquet`` / ``.pq``);
    a folder written by ``data_prep/beijing_pm25.py`` reads its ``series.parquet``. ``unknown_keys``:
    what a Parquet column not in the layout does (the CSV's extra columns are ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / "series.parquet"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_pm25_csv(path)
    if suffix in (".parquet", ".pq"):
        return load_pm25_parquet(path, unknown_keys=unknown_keys)
    raise DataError(
        f"{path}: unknown file type {path.suffix!r}; expected the UCI .csv or the .parquet of data_prep/beijing_pm25.py"
    )
