"""Checks an XLSX written by the export worker with readers that are not its writer.

    check_xlsx.py BOOK.xlsx [--csv SAME_ROWS.csv] [--lo-csv LIBREOFFICE.csv]

Always, with openpyxl: the first sheet is `orders`, its header is bold and frozen with an
autofilter, cells are typed (datetime, float, number, boolean), no cell is a formula.
--csv: every cell of every sheet (headers once per sheet) equals the CSV export of the same rows:
text exactly, numbers by value, booleans, timestamps and dates by their wall-clock value (the
XLSX holds Excel serials, the CSV RFC 3339 text of the same local time).
--lo-csv: LibreOffice's rendering of the first sheet as CSV (what a spreadsheet user sees) has
the same rows as the CSV export: text exactly, numbers once thousands separators are gone and to
the places shown, TRUE/FALSE, timestamps to the second shown.
Exits non-zero with the first differences listed.
"""
import argparse
import csv
import datetime
import re
import sys

import openpyxl

MAX_REPORTED = 10
TS = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?"
    r"(Z|[+-]\d{2}:?\d{2})?$"
)


def wall_time(text):
    """The local date-time written in `text` (offset dropped: both files hold the same local
    time), or None when it is not a date or timestamp."""
    m = TS.match(text.strip())
    if not m:
        return None
    y, mo, d, h, mi, s, frac, _ = m.groups()
    micros = int((frac or "0")[:6].ljust(6, "0"))
    try:
        return datetime.datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0), micros)
    except ValueError:
        return None


def number(text):
    """A number shown with optional thousands separators, or None."""
    t = text.strip().replace(",", "").replace("\u00a0", "")
    if not t or not re.match(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$", t):
        return None
    return float(t)


def places(text):
    t = text.strip()
    return len(t.split(".", 1)[1]) if "." in t and "e" not in t.lower() else 0


def same_typed(value, ref):
    """An openpyxl cell value against the CSV text of the same cell."""
    if value is None:
        return ref == ""
    if isinstance(value, bool):
        return ref.lower() == str(value).lower()
    if isinstance(value, (int, float)):
        n = number(ref)
        return n is not None and abs(n - value) <= 1e-9 * max(1.0, abs(value))
    if isinstance(value, datetime.datetime):
        t = wall_time(ref)
        # Excel serials carry about a millisecond of precision.
        return t is not None and abs((value - t).total_seconds()) < 0.002
    if isinstance(value, datetime.date):
        t = wall_time(ref)
        return t is not None and t.date() == value
    return str(value) == ref


def same_shown(shown, ref):
    """LibreOffice's displayed text against the CSV text of the same cell."""
    if shown == ref:
        return True
    if shown == "" or ref == "":
        return False
    if shown.upper() in ("TRUE", "FALSE"):
        return shown.lower() == ref.lower()
    a, b = number(shown), number(ref)
    if a is not None and b is not None:
        # Shown to the format's places: equal once rounded to what is shown.
        return abs(a - b) <= 0.5 * 10 ** -places(shown) + 1e-9 * abs(b)
    ta, tb = wall_time(shown), wall_time(ref)
    if ta is not None and tb is not None:
        # Shown to the second (`yyyy-mm-dd hh:mm:ss`) or the day (`yyyy-mm-dd`).
        return abs((ta - tb).total_seconds()) < (86400 if len(shown.strip()) <= 10 else 1)
    return False


def read_csv(path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.reader(f))


def compare(label, got_rows, ref_rows, same):
    """Row by row, cell by cell; returns the differences found (at most MAX_REPORTED)."""
    problems = []
    if len(got_rows) != len(ref_rows):
        problems.append(f"{label}: {len(got_rows)} rows, the CSV has {len(ref_rows)}")
    for i, (got, ref) in enumerate(zip(got_rows, ref_rows)):
        width = max(len(ref), len(got))
        got = list(got) + [None] * (width - len(got))
        ref = list(ref) + [""] * (width - len(ref))
        for j, (g, r) in enumerate(zip(got, ref)):
            if not same(g, r):
                problems.append(f"{label}: data row {i + 1}, column {j + 1}: {g!r} vs CSV {r!r}")
                if len(problems) >= MAX_REPORTED:
                    return problems
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("xlsx")
    ap.add_argument("--csv", help="the CSV export of the same rows")
    ap.add_argument("--lo-csv", help="LibreOffice's CSV rendering of the XLSX's first sheet")
    args = ap.parse_args()

    book = openpyxl.load_workbook(args.xlsx)
    assert book.sheetnames[0] == "orders", book.sheetnames
    ws = book["orders"]
    header = [c.value for c in ws[1]]
    assert header[:2] == ["Order ID", "Created at"], header
    assert all(c.font.bold for c in ws[1]), "header is bold"
    assert ws.freeze_panes == "A2", ws.freeze_panes
    assert ws.auto_filter.ref, "autofilter is set"
    row = [c for c in ws[2]]
    assert isinstance(row[1].value, datetime.datetime), row[1].value
    assert isinstance(row[6].value, float), row[6].value
    assert isinstance(row[8].value, (int, float)), row[8].value
    assert isinstance(row[9].value, bool), row[9].value
    for sheet in book.worksheets:
        for r in sheet.iter_rows():
            for c in r:
                assert c.data_type != "f", f"formula in {sheet.title}!{c.coordinate}"
    sheets = [list(s.iter_rows(values_only=True)) for s in book.worksheets]
    data_rows = sum(len(s) - 1 for s in sheets)
    print(f"openpyxl: {args.xlsx}: sheets {book.sheetnames}, {data_rows} data rows, typed cells, no formulas")

    problems = []
    if args.csv:
        ref = read_csv(args.csv)
        ref_header, ref_data = ref[0], ref[1:]
        for s, rows in zip(book.sheetnames, sheets):
            if [("" if v is None else str(v)) for v in rows[0]][: len(ref_header)] != ref_header:
                problems.append(f"sheet {s}: header {rows[0]} is not the CSV's {ref_header}")
        book_data = [r for rows in sheets for r in rows[1:]]
        found = compare("openpyxl", book_data, ref_data, same_typed)
        problems += found
        if not found:
            print(f"openpyxl: all {len(ref_data)} rows x {len(ref_header)} columns equal the CSV export {args.csv}")

    if args.lo_csv:
        if not args.csv:
            sys.exit("--lo-csv needs --csv")
        shown = read_csv(args.lo_csv)
        if shown[:1] != [ref_header]:
            problems.append(f"LibreOffice: header {shown[:1]} is not the CSV's {ref_header}")
        # LibreOffice converts the first sheet only: compare it with the CSV's first rows.
        first_sheet_data = len(sheets[0]) - 1
        found = compare("LibreOffice", shown[1:], ref_data[:first_sheet_data], same_shown)
        problems += found
        if not found:
            print(f"LibreOffice: first sheet ({first_sheet_data} rows) shows the same values as the CSV export")

    if problems:
        print("\n".join(problems[:MAX_REPORTED]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
