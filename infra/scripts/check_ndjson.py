"""Checks an NDJSON export with Python's json module, against the CSV export of the same rows.

    check_ndjson.py FILE.ndjson SAME_ROWS.csv

Every line ends with `\n` and is one JSON object whose keys are the `orders` columns by name, in
catalog order (listed below: the CSV header has labels, not names). Values are typed and equal to the CSV's cells: text exactly (the CSV
neutralises formula starts with `'`, the NDJSON never does), decimals as JSON numbers read as
`Decimal` (no float) and written with the CSV's exact text, integers, booleans, timestamps and
dates as the CSV's RFC 3339 / ISO text, and `null` where the CSV cell is empty.
Exits non-zero with the first differences listed.
"""
import csv
import json
import re
import sys
from decimal import Decimal

MAX_REPORTED = 10
# The `orders` columns and their types, in catalog order (shared/catalog.toml).
ORDERS = {
    "order_id": "string", "created_at": "timestamp", "customer_id": "string",
    "customer_name": "string", "status": "string", "currency": "string", "amount": "decimal",
    "tax": "decimal", "items": "integer", "paid": "boolean", "ship_date": "date", "note": "string",
}


def neutralised(s):
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s


def problem(key, value, cell, line):
    """None when the JSON value matches the CSV cell, else what is wrong."""
    ty = ORDERS[key]
    if value is None:
        return None if cell == "" else f"null where the CSV has {cell!r}"
    if ty == "decimal":
        if not isinstance(value, Decimal) or value != Decimal(cell):
            return f"{value!r} is not the number {cell}"
        if not re.search(rf'"{key}":{re.escape(cell)}[,}}]', line):
            return f"not written as the exact text {cell}"
        return None
    if ty == "integer":
        return None if type(value) is int and str(value) == cell else f"{value!r} != {cell}"
    if ty == "boolean":
        return None if type(value) is bool and str(value).lower() == cell else f"{value!r} != {cell}"
    if ty == "string":
        return None if isinstance(value, str) and neutralised(value) == cell else f"{value!r} vs {cell!r}"
    return None if isinstance(value, str) and value == cell else f"{value!r} != {cell!r}"


def main():
    ndjson_path, csv_path = sys.argv[1], sys.argv[2]
    text = open(ndjson_path, encoding="utf-8").read()
    rows = list(csv.reader(open(csv_path, newline="", encoding="utf-8")))[1:]
    errors = []
    if text and not text.endswith("\n"):
        errors.append("the file does not end with a newline")
    lines = text.split("\n")[:-1]
    if len(lines) != len(rows):
        errors.append(f"{len(lines)} lines, the CSV has {len(rows)} rows")
    decimals = 0
    for n, (line, cells) in enumerate(zip(lines, rows), start=1):
        obj = json.loads(line, parse_float=Decimal)
        if not isinstance(obj, dict) or list(obj) != list(ORDERS):
            errors.append(f"line {n}: keys {list(obj) if isinstance(obj, dict) else obj!r}")
            continue
        for (key, value), cell in zip(obj.items(), cells):
            why = problem(key, value, cell, line)
            if why:
                errors.append(f"line {n}, {key}: {why}")
            elif isinstance(value, Decimal):
                decimals += 1
    if errors:
        print(f"{ndjson_path}: {len(errors)} differences", file=sys.stderr)
        for e in errors[:MAX_REPORTED]:
            print(f"  {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{ndjson_path}: {len(lines)} lines, every value typed and equal to the CSV's; "
          f"{decimals} decimals as their exact text")


if __name__ == "__main__":
    main()
