//! The figures people would rather look at than read, as SVG (plotters).
use std::{ops::Range, path::Path};

use anyhow::{bail, Result};
use plotters::{
    coord::{combinators::LogCoord, types::RangedCoordf64},
    prelude::*,
};

use super::stats::Spread;

const SIZE: (u32, u32) = (800, 480);
const FONT: (&str, u32) = ("sans-serif", 20);
/// Series colours that stay apart on white (the palette's third is a pale
/// yellow); the baseline first, in grey.
const COLORS: [RGBColor; 5] = [
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<LogCoord<f64>, RangedCoordf64>>;

/// A chart with a logarithmic x axis, drawn by `draw`, with the legend of
/// its labelled series at `legend`.
fn chart(
    path: &Path,
    title: &str,
    (x, x_desc): (Range<f64>, &str),
    (y, y_desc): (Range<f64>, &str),
    legend: SeriesLabelPosition,
    draw: impl FnOnce(&mut Chart) -> Result<()>,
) -> Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, FONT)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(x.log_scale(), y)?;
    // Whole numbers, few labels and no minor lines: a logarithmic axis
    // otherwise crowds its labels and greys out its upper decades.
    let whole = |value: &f64| format!("{value:.0}");
    chart
        .configure_mesh()
        .max_light_lines(0)
        .x_labels(8)
        .x_label_formatter(&whole)
        .y_label_formatter(&whole)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    draw(&mut chart)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(legend)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Cumulative distributions on a logarithmic axis: for each series, the
/// share of its samples at or below each value.
pub fn distribution(
    path: &Path,
    title: &str,
    unit: &str,
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let positive = || {
        series
            .iter()
            .flat_map(|(_, values)| values.iter().copied())
            .filter(|v| *v > 0.0)
    };
    let (Some(low), Some(high)) = (
        positive().min_by(f64::total_cmp),
        positive().max_by(f64::total_cmp),
    ) else {
        bail!("{title}: no samples to draw");
    };
    chart(
        path,
        title,
        (low * 0.9..high * 1.1, unit),
        (0.0..100.0, "% of samples at or below"),
        SeriesLabelPosition::LowerRight,
        |chart| {
            for (index, (name, values)) in series.iter().enumerate() {
                let mut sorted: Vec<f64> = values.iter().copied().filter(|v| *v > 0.0).collect();
                sorted.sort_by(f64::total_cmp);
                let count = sorted.len() as f64;
                let color = COLORS[index % COLORS.len()].to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        sorted
                            .iter()
                            .enumerate()
                            .map(|(rank, value)| (*value, (rank + 1) as f64 * 100.0 / count)),
                        color.stroke_width(2),
                    ))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
            Ok(())
        },
    )
}

/// Kernel time per query (median, p10–p90 bars) against the policy's size,
/// with the target as a line.
pub fn cost_by_policy_size(path: &Path, points: &[(usize, Spread)], target_ns: f64) -> Result<()> {
    let (Some(smallest), Some(largest)) = (
        points.iter().map(|(entries, _)| *entries).min(),
        points.iter().map(|(entries, _)| *entries).max(),
    ) else {
        bail!("cost by policy size: no points to draw");
    };
    let top = points
        .iter()
        .map(|(_, spread)| spread.p90)
        .fold(target_ns, f64::max)
        * 1.2;
    let (left, right) = (smallest as f64 / 2.0, largest as f64 * 2.0);
    chart(
        path,
        "Kernel time per allowed DNS query (egress + ingress)",
        (left..right, "policy entries"),
        (0.0..top, "ns per query (median, p10–p90)"),
        SeriesLabelPosition::UpperLeft,
        |chart| {
            let blue = BLUE.to_rgba();
            chart
                .draw_series(points.iter().map(|(entries, spread)| {
                    ErrorBar::new_vertical(
                        *entries as f64,
                        spread.p10,
                        spread.median,
                        spread.p90,
                        blue.filled(),
                        12,
                    )
                }))?
                .label("measured")
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, blue.filled()));
            chart
                .draw_series(LineSeries::new(
                    [(left, target_ns), (right, target_ns)],
                    RED.stroke_width(2),
                ))?
                .label(format!("target ≤ {target_ns:.0} ns"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drawn(name: &str, draw: impl FnOnce(&Path) -> Result<()>) -> String {
        let path =
            std::env::temp_dir().join(format!("guard-chart-{}-{name}.svg", std::process::id()));
        draw(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        svg
    }

    #[test]
    fn distributions_are_svg_with_a_legend() {
        let svg = drawn("distribution", |path| {
            distribution(
                path,
                "Start-up",
                "ms",
                &[
                    ("true".into(), vec![0.5, 0.7, 0.6]),
                    ("guarded".into(), vec![40.0, 55.0, 47.0]),
                ],
            )
        });
        assert!(svg.starts_with("<svg"), "{svg}");
        for text in ["Start-up", "guarded", "% of samples at or below"] {
            assert!(svg.contains(text), "{text} missing from {svg}");
        }
    }

    #[test]
    fn cost_by_size_draws_the_target() {
        let spread = Spread::of(&[200.0, 210.0, 230.0]);
        let svg = drawn("cost", |path| {
            cost_by_policy_size(path, &[(10, spread), (100_000, spread)], 250.0)
        });
        assert!(svg.contains("target ≤ 250 ns"), "{svg}");
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let path = std::env::temp_dir().join("guard-chart-empty.svg");
        assert!(distribution(&path, "empty", "ms", &[("none".into(), vec![])]).is_err());
        assert!(cost_by_policy_size(&path, &[], 250.0).is_err());
    }
}
