//! What a long operation shows while it runs: on a terminal one line per
//! phase with bytes moved of total and the rate; with `--json`, the same as
//! JSON lines on stdout (`{"event":"progress",...}`), ending with one
//! `{"event":"result",...}` line.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone)]
pub struct Progress {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    json: bool,
    tty: bool,
    phase: String,
    phase_start: Instant,
    total: u64,
    last: Option<Instant>,
    open_line: bool,
}

/// Milliseconds since the epoch: what two hosts' figures are compared by.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

impl Progress {
    pub fn new(json: bool) -> Self {
        Progress {
            inner: Arc::new(Mutex::new(Inner {
                json,
                tty: std::io::stderr().is_terminal(),
                phase: String::new(),
                phase_start: Instant::now(),
                total: 0,
                last: None,
                open_line: false,
            })),
        }
    }

    pub fn json(&self) -> bool {
        self.inner.lock().map(|i| i.json).unwrap_or(false)
    }

    /// A new phase; `total` bytes when known (0: unknown).
    pub fn phase(&self, name: &str, total: u64) {
        let Ok(mut i) = self.inner.lock() else { return };
        i.end_line();
        i.phase = name.to_string();
        i.phase_start = Instant::now();
        i.total = total;
        i.last = None;
        if i.json {
            println!(
                "{}",
                serde_json::json!({"event": "phase", "phase": name, "total": total, "at_ms": wall_ms()})
            );
        } else if i.tty {
            eprint!("{name}…");
            i.open_line = true;
        }
    }

    /// Bytes moved so far in the current phase (throttled to 10 per second).
    pub fn bytes(&self, done: u64) {
        let Ok(mut i) = self.inner.lock() else { return };
        let now = Instant::now();
        if i.last.is_some_and(|l| now - l < Duration::from_millis(100)) && done < i.total {
            return;
        }
        i.last = Some(now);
        let secs = (now - i.phase_start).as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        if i.json {
            println!(
                "{}",
                serde_json::json!({"event": "progress", "phase": i.phase, "bytes": done,
                    "total": i.total, "bytes_per_sec": rate as u64, "at_ms": wall_ms()})
            );
        } else if i.tty {
            let total = if i.total > 0 {
                format!(" of {}", human(i.total))
            } else {
                String::new()
            };
            eprint!(
                "\r\x1b[K{}: {}{} ({}/s)",
                i.phase,
                human(done),
                total,
                human(rate as u64)
            );
            i.open_line = true;
        }
    }

    /// A line for a person (stderr), or a `{"event":"note"}` in JSON mode.
    pub fn note(&self, text: &str) {
        let Ok(mut i) = self.inner.lock() else { return };
        i.end_line();
        if i.json {
            println!(
                "{}",
                serde_json::json!({"event": "note", "text": text, "at_ms": wall_ms()})
            );
        } else {
            eprintln!("{text}");
        }
    }

    /// The final figures: a table for a person, one JSON line for a script.
    pub fn result(&self, value: serde_json::Value, table: &[(String, String)]) {
        let Ok(mut i) = self.inner.lock() else { return };
        i.end_line();
        if i.json {
            let mut v = value;
            v["event"] = "result".into();
            println!("{v}");
        } else {
            let w = table.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            let mut out = std::io::stdout().lock();
            for (k, v) in table {
                let _ = writeln!(out, "{k:<w$}  {v}");
            }
        }
    }
}

impl Inner {
    fn end_line(&mut self) {
        if self.open_line {
            eprintln!();
            self.open_line = false;
        }
    }
}
