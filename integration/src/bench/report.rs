//! The benchmark's figures, both runtimes side by side: results.json (every sample) and
//! results.md (medians, spread, ratios custom/Go, the targets).

use std::fmt::Write as _;

use integration::Runtime;

use super::stats::Stats;

/// One figure, measured on one or both runtimes.
pub struct Metric {
    pub key: String,
    /// Section of results.md.
    pub group: &'static str,
    /// Chart panel (one unit per panel).
    pub panel: &'static str,
    pub label: String,
    pub unit: &'static str,
    pub higher_is_better: bool,
    go: Vec<f64>,
    custom: Vec<f64>,
}

impl Metric {
    pub fn stats(&self, rt: Runtime) -> Option<Stats> {
        Stats::of(match rt {
            Runtime::RuncV2 => &self.go,
            Runtime::Custom => &self.custom,
        })
    }

    /// custom/Go of the medians.
    pub fn ratio(&self) -> Option<f64> {
        let go = self.stats(Runtime::RuncV2)?.median;
        let custom = self.stats(Runtime::Custom)?.median;
        (go != 0.0).then(|| custom / go)
    }
}

/// A target from the issue, checked against the medians (reported, never asserted).
pub struct Target {
    pub what: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Default)]
pub struct Results {
    pub metrics: Vec<Metric>,
    pub targets: Vec<Target>,
    /// Free-form facts for the report (name, value).
    pub notes: Vec<(String, String)>,
}

/// The figures of one group of the report (one table), declared without repeating the group.
pub struct Group<'r> {
    res: &'r mut Results,
    group: &'static str,
}

impl Group<'_> {
    /// A figure where lower is better, in `unit`, drawn in the chart's `panel`.
    pub fn lower(
        &mut self,
        key: impl AsRef<str>,
        panel: &'static str,
        label: impl AsRef<str>,
        unit: &'static str,
    ) -> &mut Self {
        self.figure(key.as_ref(), panel, label.as_ref(), unit, false)
    }

    /// A figure where higher is better (a rate).
    pub fn higher(
        &mut self,
        key: impl AsRef<str>,
        panel: &'static str,
        label: impl AsRef<str>,
        unit: &'static str,
    ) -> &mut Self {
        self.figure(key.as_ref(), panel, label.as_ref(), unit, true)
    }

    fn figure(
        &mut self,
        key: &str,
        panel: &'static str,
        label: &str,
        unit: &'static str,
        higher_is_better: bool,
    ) -> &mut Self {
        let g = self.group;
        self.res
            .declare(key, g, panel, label, unit, higher_is_better);
        self
    }
}

impl Results {
    /// The figures of `group`, declared in the order they are to be reported.
    pub fn group(&mut self, group: &'static str) -> Group<'_> {
        Group { res: self, group }
    }

    /// Declares a figure (the order of declaration is the order of the report).
    pub fn declare(
        &mut self,
        key: &str,
        group: &'static str,
        panel: &'static str,
        label: &str,
        unit: &'static str,
        higher_is_better: bool,
    ) {
        if self.metric(key).is_none() {
            self.metrics.push(Metric {
                key: key.to_string(),
                group,
                panel,
                label: label.to_string(),
                unit,
                higher_is_better,
                go: Vec::new(),
                custom: Vec::new(),
            });
        }
    }

    pub fn add(&mut self, key: &str, rt: Runtime, value: f64) {
        let m = self
            .metrics
            .iter_mut()
            .find(|m| m.key == key)
            .unwrap_or_else(|| panic!("metric {key} not declared"));
        match rt {
            Runtime::RuncV2 => m.go.push(value),
            Runtime::Custom => m.custom.push(value),
        }
    }

    pub fn metric(&self, key: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.key == key)
    }

    /// Median of `key` on `rt`.
    pub fn median(&self, key: &str, rt: Runtime) -> Option<f64> {
        Some(self.metric(key)?.stats(rt)?.median)
    }

    pub fn note(&mut self, name: &str, value: impl Into<String>) {
        self.notes.push((name.to_string(), value.into()));
    }

    pub fn to_json(&self, meta: serde_json::Value) -> serde_json::Value {
        let stats = |s: Option<Stats>| s.map(|s| s.to_json()).unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "meta": meta,
            "notes": self.notes.iter().map(|(k, v)| serde_json::json!({"name": k, "value": v})).collect::<Vec<_>>(),
            "metrics": self.metrics.iter().map(|m| serde_json::json!({
                "key": m.key,
                "group": m.group,
                "panel": m.panel,
                "label": m.label,
                "unit": m.unit,
                "higher_is_better": m.higher_is_better,
                "go": stats(m.stats(Runtime::RuncV2)),
                "custom": stats(m.stats(Runtime::Custom)),
                "ratio_custom_over_go": m.ratio(),
            })).collect::<Vec<_>>(),
            "targets": self.targets.iter().map(|t| serde_json::json!({
                "target": t.what,
                "measured": t.measured,
                "met": t.met,
            })).collect::<Vec<_>>(),
        })
    }

    /// results.md: run facts, targets, one table a group, then the checkpoint phases.
    pub fn to_markdown(&self, title: &str, meta: &[(String, String)], phases: &str) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# {title}\n");
        for (k, v) in meta {
            let _ = writeln!(md, "- **{k}**: {v}");
        }
        let _ = writeln!(
            md,
            "\nEvery figure is measured on both runtimes in the same run, interleaved (the order \
             alternates each round). Cells: median (p95; min–max, n samples). *Go* is \
             containerd's `io.containerd.runc.v2` (containerd-shim-runc-v2), *custom* is \
             `io.containerd.custom.v2` (release build).\n"
        );
        let _ = writeln!(md, "## Targets (reported, not asserted)\n");
        let _ = writeln!(md, "| target | measured | met |\n|---|---|---|");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            };
            let _ = writeln!(md, "| {} | {} | {met} |", t.what, t.measured);
        }
        let mut groups: Vec<&str> = Vec::new();
        for m in &self.metrics {
            if !groups.contains(&m.group) {
                groups.push(m.group);
            }
        }
        for g in groups {
            let _ = writeln!(md, "\n## {g}\n");
            let _ = writeln!(
                md,
                "| figure | unit | Go (runc.v2) | custom | custom/Go |\n|---|---|---|---|---|"
            );
            for m in self.metrics.iter().filter(|m| m.group == g) {
                let cell = |rt| match m.stats(rt) {
                    Some(s) => format!(
                        "{} ({}; {}–{}, n={})",
                        num(s.median),
                        num(s.p95),
                        num(s.min),
                        num(s.max),
                        s.n
                    ),
                    None => "—".to_string(),
                };
                let ratio = m
                    .ratio()
                    .map(|r| format!("{r:.2}"))
                    .unwrap_or_else(|| "—".to_string());
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {ratio} |",
                    m.label,
                    m.unit,
                    cell(Runtime::RuncV2),
                    cell(Runtime::Custom)
                );
            }
        }
        md.push_str(phases);
        if !self.notes.is_empty() {
            let _ = writeln!(md, "\n## Notes\n");
            for (k, v) in &self.notes {
                let _ = writeln!(md, "- **{k}**: {v}");
            }
        }
        md
    }
}

/// A number with a sensible number of digits.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
