//! Medians with spread, and interleaved sampling.
//!
//! The machine is shared and noisy, so no figure is a single run: each is
//! the median of many, with the 10th and 90th percentiles beside it, and
//! the runs being compared alternate so drift hits every side alike.
use anyhow::Result;
use serde_json::{json, Value};

/// The median of some samples, with the 10th and 90th percentiles.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub samples: usize,
}

impl Spread {
    /// Panics on no samples: every caller takes at least one.
    pub fn of(values: &[f64]) -> Spread {
        assert!(!values.is_empty(), "a spread of no samples");
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: percentile(&sorted, 0.5),
            p10: percentile(&sorted, 0.1),
            p90: percentile(&sorted, 0.9),
            samples: sorted.len(),
        }
    }

    /// `12.3 (10.1–14.0)`, with `decimals` decimals.
    pub fn text(&self, decimals: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.p10,
            self.p90,
            d = decimals
        )
    }

    pub fn json(&self) -> Value {
        json!({"median": self.median, "p10": self.p10, "p90": self.p90, "samples": self.samples})
    }
}

/// The `p` quantile (0..=1) of sorted values, interpolated between the two
/// nearest.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let position = (sorted.len() - 1) as f64 * p;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

/// `rounds` rounds of one sample from each of `arms` arms, in alternating
/// order (0, 1, .. then .., 1, 0), so that neither side always runs first
/// (warm caches) or last. Returns the samples per arm.
pub fn interleaved<T>(
    rounds: usize,
    arms: usize,
    mut sample: impl FnMut(usize) -> Result<T>,
) -> Result<Vec<Vec<T>>> {
    let mut samples: Vec<Vec<T>> = (0..arms).map(|_| Vec::with_capacity(rounds)).collect();
    for round in 0..rounds {
        for step in 0..arms {
            let arm = if round % 2 == 0 {
                step
            } else {
                arms - 1 - step
            };
            samples[arm].push(sample(arm)?);
        }
    }
    Ok(samples)
}

/// Per-round differences `b - a` of two interleaved arms.
pub fn differences(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| b - a).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_interpolates_percentiles() {
        let spread = Spread::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(spread.median, 3.0);
        assert!((spread.p10 - 1.4).abs() < 1e-9);
        assert!((spread.p90 - 4.6).abs() < 1e-9);
        assert_eq!(spread.text(1), "3.0 (1.4–4.6)");
    }

    #[test]
    fn interleaving_alternates_the_order() {
        let mut order = Vec::new();
        let samples = interleaved(3, 2, |arm| {
            order.push(arm);
            Ok(arm as f64)
        })
        .unwrap();
        assert_eq!(order, [0, 1, 1, 0, 0, 1]);
        assert_eq!(samples, [vec![0.0; 3], vec![1.0; 3]]);
        assert_eq!(differences(&samples[0], &samples[1]), [1.0; 3]);
    }
}
