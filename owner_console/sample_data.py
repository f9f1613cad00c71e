"""A deterministic, synthetic patients table for the demo and the tests.

No real person is in it: names are drawn from short lists, and every other
column from fixed distributions with a seeded generator, so the same
``(rows, seed)`` always gives the same bytes.
"""
from __future__ import annotations

import datetime as _dt
import random
from pathlib import Path

import polars as pl

FIRST_NAMES = ("Ada", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas",
               "Keiko", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tara",
               "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe")
LAST_NAMES = ("Adams", "Bauer", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Huang", "Ivanova",
              "Jensen", "Kowalski", "Lopez", "Martin", "Nakamura", "Okafor", "Petrov", "Quispe",
              "Rossi", "Silva", "Tanaka", "Ueda", "Vargas", "Weber", "Xu", "Yilmaz", "Zhang")
# (diagnosis, relative frequency, mean cost in euros)
DIAGNOSES = (("hypertension", 22, 1800.0), ("diabetes", 15, 3400.0), ("asthma", 12, 1200.0),
             ("influenza", 18, 600.0), ("fracture", 9, 5200.0), ("depression", 10, 2100.0),
             ("heart failure", 6, 14500.0), ("appendicitis", 4, 7800.0), ("migraine", 3, 900.0),
             ("rare disease X", 1, 48000.0))
ZIP_CODES = tuple(f"750{n:02d}" for n in range(1, 21))


def generate_patients(rows: int = 5000, seed: int = 20260101) -> pl.DataFrame:
    """Make the synthetic patients table.

    Columns: ``patient_id``, ``name``, ``age``, ``sex``, ``zip``,
    ``diagnosis``, ``admission_date``, ``length_of_stay``, ``cost``,
    ``smoker``.  A few ``cost`` and ``smoker`` values are null, as in real
    extracts.
    """
    rng = random.Random(seed)
    names, ages, sexes, zips, diagnoses, dates, stays, costs, smokers = ([] for _ in range(9))
    weights = [w for _, w, _ in DIAGNOSES]
    start = _dt.date(2023, 1, 1)
    for _ in range(rows):
        names.append(f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}")
        age = max(0, min(99, int(rng.gauss(47, 19))))
        ages.append(age)
        sexes.append(rng.choice(("F", "M")))
        zips.append(rng.choice(ZIP_CODES))
        diagnosis, _, mean_cost = rng.choices(DIAGNOSES, weights=weights)[0]
        diagnoses.append(diagnosis)
        dates.append(start + _dt.timedelta(days=rng.randrange(730)))
        stay = max(1, int(rng.expovariate(1 / 4)))
        stays.append(stay)
        cost = round(rng.lognormvariate(0, 0.4) * mean_cost * (1 + stay / 10), 2)
        costs.append(None if rng.random() < 0.01 else cost)
        smokers.append(None if rng.random() < 0.05 else rng.random() < 0.22)
    return pl.DataFrame({
        "patient_id": list(range(1, rows + 1)),
        "name": names,
        "age": ages,
        "sex": sexes,
        "zip": zips,
        "diagnosis": diagnoses,
        "admission_date": dates,
        "length_of_stay": stays,
        "cost": costs,
        "smoker": smokers,
    }, schema={"patient_id": pl.Int64, "name": pl.String, "age": pl.Int64, "sex": pl.String,
               "zip": pl.String, "diagnosis": pl.String, "admission_date": pl.Date,
               "length_of_stay": pl.Int64, "cost": pl.Float64, "smoker": pl.Boolean})


def write_patients(path: str | Path, rows: int = 5000, seed: int = 20260101) -> Path:
    """Write the table as CSV or Parquet, by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = generate_patients(rows, seed)
    if path.suffix == ".parquet":
        table.write_parquet(path)
    else:
        table.write_csv(path)
    return path


if __name__ == "__main__":
    import sys
    out = write_patients(sys.argv[1] if len(sys.argv) > 1 else "patients.csv")
    print(out)
