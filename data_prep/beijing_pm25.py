"""Check the UCI "Beijing PM2.5 Data" CSV and write the hourly series the forecasting task reads.

    python data_prep/beijing_pm25.py --csv beijing_pm25.csv --out DIR
        [--train-years 2010 2011 2012] [--val-years 2013] [--test-years 2014] [--overwrite]

The CSV goes through ``mmpo_tasks.forecasting.data`` (columns, plausible ranges with their units,
dates, duplicate hours), is reindexed to every hour from its first to its last (absent hours
inserted with PM2.5 missing; weather forward-filled and flagged), split by calendar year, and the
normalizer is fitted on the training years. Layout of DIR (written in ``DIR.tmp-<pid>``, then
renamed into place):

- ``series.parquet``: one row per hour: ``time``, ``pm2.5`` (NaN where not measured, never
  imputed), ``DEWP``, ``TEMP``, ``PRES``, ``cbwd``, ``Iws``, ``Is``, ``Ir``, ``weather_filled``;
- ``stats.json``: ``source``, ``normalizer`` (``Normalizer.to_dict()``), ``split_years``,
  ``hours`` / ``pm25_missing_hours`` / ``weather_filled_hours`` / ``hours_inserted`` per split
  (and ``total``), ``pm25_observed_frac_ge`` (fraction of measured hours at or above 35 and 75
  µg/m³ per split), ``rows_in_file``.

Read it back with ``mmpo_tasks.forecasting.data.load_splits(DIR / "series.parquet", ...)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmpo.checkpoint import atomic_folder, check_output_folder
from mmpo.errors import MMPOError
from mmpo_tasks.forecasting.data import (
    FRAME_COLUMNS,
    PM25,
    Normalizer,
    SplitConfig,
    build_series,
    check_year_sets,
    read_pm25_csv,
    split_by_time,
)

THRESHOLDS = (35, 75)  # µg/m³: WHO 2005 interim target 1 / China's Grade II 24-h limit


def _counts(frame: pd.DataFrame, inserted: np.ndarray) -> dict[str, Any]:
    pm = frame[PM25].to_numpy()
    seen = pm[~np.isnan(pm)]
    return {
        "hours": int(len(frame)),
        "pm25_missing_hours": int(np.isnan(pm).sum()),
        "weather_filled_hours": int(frame["weather_filled"].sum()),
        "hours_inserted": int(inserted.sum()),
        "pm25_observed_frac_ge": {str(t): (float((seen >= t).mean()) if seen.size else None) for t in THRESHOLDS},
    }


def prepare(
    csv: str | Path,
    out: str | Path,
    split: SplitConfig = SplitConfig(),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Check ``csv`` and write ``out/series.parquet`` and ``out/stats.json`` (layout: module
    docstring); returns the stats dict."""
    out = Path(out)
    sets = check_year_sets(split.train_years, split.val_years, split.test_years)
    check_output_folder(out, overwrite)
    frame, inserted_all = read_pm25_csv(csv)
    frames = split_by_time(frame, sets["train"], sets["val"], sets["test"])
    normalizer = Normalizer.fit(frames["train"])
    for f in frames.values():  # the covariates must compute on every split (finite, filled weather)
        build_series(f, normalizer)

    inserted = pd.Series(inserted_all, index=frame.index)
    stats: dict[str, Any] = {
        "source": str(csv),
        "rows_in_file": int(frame.attrs.get("rows_in_file", len(frame))),
        "first_hour": f"{frame.index[0]:%Y-%m-%d %H:00}",
        "last_hour": f"{frame.index[-1]:%Y-%m-%d %H:00}",
        "split_years": sets,
        "normalizer": normalizer.to_dict(),
        "splits": {name: _counts(f, inserted.loc[f.index].to_numpy()) for name, f in frames.items()},
        "total": _counts(frame, inserted_all),
    }

    table = frame[list(FRAME_COLUMNS)].copy()
    table.index = table.index.as_unit("s")
    table = table.reset_index()  # "time" column first
    table["cbwd"] = table["cbwd"].astype("string")

    with atomic_folder(
        out, before_replace=lambda: check_output_folder(out, overwrite)
    ) as tmp:  # re-checked: something may have appeared meanwhile
        table.to_parquet(tmp / "series.parquet", index=False)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SplitConfig()
    p.add_argument(
        "--csv",
        required=True,
        help="the UCI Beijing PM2.5 CSV (No,year,month,day,hour,pm2.5,DEWP,TEMP,PRES,cbwd,Iws,Is,Ir)",
    )
    p.add_argument("--out", required=True, help="output folder (series.parquet, stats.json)")
    p.add_argument("--train-years", type=int, nargs="+", default=list(d.train_years), help="default 2010 2011 2012")
    p.add_argument("--val-years", type=int, nargs="+", default=list(d.val_years), help="default 2013")
    p.add_argument("--test-years", type=int, nargs="+", default=list(d.test_years), help="default 2014")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    a = p.parse_args(argv)
    split = SplitConfig(tuple(a.train_years), tuple(a.val_years), tuple(a.test_years))
    try:
        stats = prepare(a.csv, a.out, split, overwrite=a.overwrite)
    except MMPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parts = ", ".join(
        f"{name} {s['hours']} h ({s['pm25_missing_hours']} without PM2.5)" for name, s in stats["splits"].items()
    )
    print(f"{a.out}: {stats['total']['hours']} hours, {stats['total']['hours_inserted']} inserted; {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
