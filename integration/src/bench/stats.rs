//! Summaries of repeated measurements.

/// Median, p95 (nearest rank), spread and mean of a set of samples.
#[derive(Clone, Debug)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub p95: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    /// None for no samples.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        let rank = ((0.95 * n as f64).ceil() as usize).clamp(1, n);
        Some(Stats {
            n,
            median,
            p95: s[rank - 1],
            min: s[0],
            max: s[n - 1],
            mean: s.iter().sum::<f64>() / n as f64,
            samples: samples.to_vec(),
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "n": self.n,
            "median": self.median,
            "p95": self.p95,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "samples": self.samples,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Stats;

    #[test]
    fn median_p95_spread() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(
            (s.median, s.p95, s.min, s.max, s.mean),
            (3.0, 5.0, 1.0, 5.0, 3.0)
        );
        let s = Stats::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.median, 2.5);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(Stats::of(&v).unwrap().p95, 95.0);
        assert!(Stats::of(&[]).is_none());
    }
}
