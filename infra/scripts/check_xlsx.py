"""Opens an XLSX written by the export worker with openpyxl (an independent reader) and checks
what a spreadsheet user relies on: sheets, a bold frozen header, typed cells, no formulas."""
import datetime
import sys

import openpyxl

path = sys.argv[1]
book = openpyxl.load_workbook(path)
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
print(f"openpyxl: {path}: sheets {book.sheetnames}, {ws.max_row - 1} rows on the first, typed cells, no formulas")
