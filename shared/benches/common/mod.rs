//! What the benches share: deterministic synthetic `orders` rows, and what `/proc` says about
//! the process measuring them.

use std::error::Error;

use chrono::{DateTime, Utc};
use shared::domain::{Column, Row, Value};

pub type Res<T> = Result<T, Box<dyn Error>>;

/// What this run of the bench is for.
pub enum Invocation {
    /// Measure one case (the bench re-executed by [`run_case`]).
    Child { case: String, rows: u64 },
    /// Run every case for each of these row counts: the arguments, else `BENCH_ROWS` (a comma
    /// list), else the default.
    Parent { rows: Vec<u64> },
}

pub fn invocation(default_rows: &[u64]) -> Res<Invocation> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if let [flag, case, rows] = args.as_slice() {
        if flag == "--case" {
            return Ok(Invocation::Child {
                case: case.clone(),
                rows: rows.parse()?,
            });
        }
    }
    let mut rows: Vec<u64> = args
        .iter()
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    if rows.is_empty() {
        rows = match std::env::var("BENCH_ROWS") {
            Ok(v) => v
                .split(',')
                .map(|s| s.trim().replace('_', "").parse())
                .collect::<Result<_, _>>()?,
            Err(_) => default_rows.to_vec(),
        };
    }
    Ok(Invocation::Parent { rows })
}

/// The cases `BENCH_CASES` names (a comma list), else `default`.
pub fn cases(default: &[&str]) -> Vec<String> {
    match std::env::var("BENCH_CASES") {
        Ok(v) => v.split(',').map(|s| s.trim().to_string()).collect(),
        Err(_) => default.iter().map(|s| s.to_string()).collect(),
    }
}

/// Runs one case in a child process (this bench re-executed with `--case`), so its peak RSS is
/// its own; returns what the child printed.
pub fn run_case(case: &str, rows: u64) -> Res<String> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--case", case, &rows.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "case {case} with {rows} rows failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Bytes this process caused to be written to storage so far.
pub fn disk_write_bytes() -> Res<u64> {
    proc_self_field("io", "write_bytes:")
}

pub fn peak_rss_kib() -> Res<u64> {
    proc_self_field("status", "VmHWM:")
}

/// The number after `key` in `/proc/self/{file}` (a unit after it is dropped).
pub fn proc_self_field(file: &str, key: &str) -> Res<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/{file}"))?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .ok_or(format!("no {key} in /proc/self/{file}"))?;
    Ok(value.trim().trim_end_matches("kB").trim().parse()?)
}

/// Deterministic synthetic `orders` rows: row `i` is always the same, so every case and every
/// run encodes the same data.
pub struct Orders {
    positions: [usize; 12],
    epoch: DateTime<Utc>,
}

const FIRST_NAMES: [&str; 24] = [
    "Ada", "Grace", "Siobhán", "Zoë", "Wei", "Jean-Luc", "Søren", "Björk", "Émile", "Olu", "Priya",
    "Mateo", "Yuki", "Fatima", "Lars", "Ines", "Kofi", "Mia", "Noah", "Aiko", "Omar", "Elena",
    "Tomás", "Hana",
];
const LAST_NAMES: [&str; 24] = [
    "Lovelace",
    "Hopper",
    "O'Brien",
    "Martín",
    "Müller",
    "Ng",
    "Picard",
    "Kierkegaard",
    "Guðmundsdóttir",
    "Zola",
    "Okafor",
    "Sharma",
    "García",
    "Tanaka",
    "Haddad",
    "Larsen",
    "Ferreira",
    "Mensah",
    "Rossi",
    "Smith",
    "Suzuki",
    "Khan",
    "Novak",
    "Kim",
];
/// One name in 16 is one of these: quotes, commas, formula starts, other scripts.
const ODD_NAMES: [&str; 8] = [
    "Zoë \"Z\" Martín",
    "Smith & Sons, Ltd.",
    "=HYPERLINK(\"http://evil\")",
    "-20% customer",
    "@mention",
    "株式会社テスト",
    "Ng, Wei",
    "+44 20 7946 0000",
];
const STATUSES: [&str; 5] = ["pending", "paid", "shipped", "cancelled", "refunded"];
const CURRENCIES: [&str; 3] = ["EUR", "USD", "GBP"];
const NOTES: [&str; 4] = [
    "leave at the door",
    "gift, wrap please",
    "call before \"delivery\"",
    "fragile\nhandle with care",
];
const COLUMN_NAMES: [&str; 12] = [
    "order_id",
    "created_at",
    "customer_id",
    "customer_name",
    "status",
    "currency",
    "amount",
    "tax",
    "items",
    "paid",
    "ship_date",
    "note",
];

impl Orders {
    pub fn new(columns: &[Column]) -> Res<Self> {
        let mut positions = [0; 12];
        for (p, name) in positions.iter_mut().zip(COLUMN_NAMES) {
            *p = columns
                .iter()
                .position(|c| c.name == name)
                .ok_or(format!("orders has no column {name}"))?;
        }
        Ok(Self {
            positions,
            epoch: DateTime::parse_from_rfc3339("2023-01-01T00:00:00Z")?.with_timezone(&Utc),
        })
    }

    pub fn fill(&mut self, page: &mut Vec<Row>, first: u64, n: usize) {
        page.clear();
        for i in first..first + n as u64 {
            page.push(self.row(i));
        }
    }

    pub fn row(&self, i: u64) -> Row {
        let mut r = Rng(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let created = self.epoch + chrono::Duration::seconds((i * 37 + r.below(30)) as i64);
        let cents = 100 + r.below(500_000);
        let tax = cents / 5;
        let ship = (r.below(4) != 0)
            .then(|| created.date_naive() + chrono::Duration::days(1 + r.below(10) as i64));
        let note = (r.below(5) == 0).then(|| NOTES[r.below(4) as usize]);
        let mut row = vec![Value::Null; 12];
        let values = [
            Value::Str(format!("ORD-acme-{i:08}")),
            Value::Ts(created),
            Value::Str(format!("CUST-{:06}", r.below(50_000))),
            Value::Str(if r.below(16) == 0 {
                ODD_NAMES[r.below(ODD_NAMES.len() as u64) as usize].to_string()
            } else {
                format!(
                    "{} {}",
                    FIRST_NAMES[r.below(FIRST_NAMES.len() as u64) as usize],
                    LAST_NAMES[r.below(LAST_NAMES.len() as u64) as usize]
                )
            }),
            Value::Str(STATUSES[r.below(5) as usize].to_string()),
            Value::Str(CURRENCIES[r.below(3) as usize].to_string()),
            Value::Dec(format!("{}.{:02}", cents / 100, cents % 100)),
            Value::Dec(format!("{}.{:02}", tax / 100, tax % 100)),
            Value::Int(1 + r.below(20) as i64),
            Value::Bool(r.below(2) == 0),
            ship.map_or(Value::Null, Value::Date),
            note.map_or(Value::Null, |n| Value::Str(n.to_string())),
        ];
        for (p, v) in self.positions.iter().zip(values) {
            row[*p] = v;
        }
        row
    }
}

/// xorshift64: fast and good enough for test data.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn size(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
