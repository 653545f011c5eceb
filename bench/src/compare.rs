//! `shardmq-bench compare`: several runs' JSON summaries (and the .hgrm files beside them)
//! drawn into one latency-by-percentile chart, and a Markdown table with ratios against the
//! first run.
//!
//! Owns: reading summaries and percentile distributions, the table, the chart.
//! Never: measures anything; it only reads what `run` wrote.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Deserialize;

/// The parts of a run's JSON summary the comparison uses.
#[derive(Debug, Clone, Deserialize)]
pub struct RunSummary {
    pub label: String,
    pub scenario: String,
    pub qos: u8,
    pub messages_per_second: f64,
    pub lost: u64,
    pub latency_us: Latency,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// One run: its summary and its percentile curve as (percentile 0..1, latency us).
#[derive(Debug, Clone)]
pub struct Run {
    pub summary: RunSummary,
    pub curve: Vec<(f64, f64)>,
}

/// Reads `path` (a JSON summary) and the `.hgrm` beside it if there is one; without it the
/// curve is the summary's five percentiles.
pub fn load(path: &Path) -> Result<Run, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let summary: RunSummary =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let hgrm = path.with_extension("hgrm");
    let curve = match std::fs::read_to_string(&hgrm) {
        Ok(text) => parse_hgrm(&text),
        Err(_) => {
            let l = &summary.latency_us;
            vec![
                (0.5, l.p50 as f64),
                (0.9, l.p90 as f64),
                (0.99, l.p99 as f64),
                (0.999, l.p999 as f64),
                (0.99999, l.max as f64),
            ]
        }
    };
    Ok(Run { summary, curve })
}

/// The (percentile, value) points of an HdrHistogram percentile distribution (.hgrm).
pub fn parse_hgrm(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| {
            let mut columns = line.split_whitespace();
            let value: f64 = columns.next()?.parse().ok()?;
            let percentile: f64 = columns.next()?.parse().ok()?;
            Some((percentile, value))
        })
        .collect()
}

/// The Markdown table: one row per run, ratios against the first.
pub fn table(runs: &[Run]) -> String {
    let mut text = String::from(
        "| run | scenario | QoS | delivered msg/s | p50 us | p90 us | p99 us | p99.9 us | max us | lost | msg/s vs first | p99 vs first |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let Some(first) = runs.first() else {
        return text;
    };
    for run in runs {
        let s = &run.summary;
        let l = &s.latency_us;
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.3}x", a / b)
            } else {
                "-".into()
            }
        };
        text.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.label,
            s.scenario,
            s.qos,
            s.messages_per_second,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            s.lost,
            ratio(s.messages_per_second, first.summary.messages_per_second),
            ratio(l.p99 as f64, first.summary.latency_us.p99 as f64),
        ));
    }
    text
}

/// "Nines" for the x axis: 0 at the median's left edge, 1 at 90%, 2 at 99%, ...
fn nines(percentile: f64) -> f64 {
    (-(1.0 - percentile.min(0.999_999)).log10()).max(0.0)
}

/// A TrueType font for the chart's text: DejaVu Sans from Debian's fonts-dejavu-core, or
/// `SHARDMQ_BENCH_FONT`.
fn find_font() -> Option<PathBuf> {
    let candidates = [
        std::env::var("SHARDMQ_BENCH_FONT").ok().map(PathBuf::from),
        Some(PathBuf::from(
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        )),
        Some(PathBuf::from("/usr/share/fonts/TTF/DejaVuSans.ttf")),
    ];
    candidates.into_iter().flatten().find(|path| path.exists())
}

/// Draws the runs into `prefix.svg` and `prefix.png`; returns the files written.
pub fn chart(runs: &[Run], prefix: &Path) -> Result<Vec<PathBuf>, String> {
    let font = find_font().ok_or("no TrueType font found for the chart (install fonts-dejavu-core or set SHARDMQ_BENCH_FONT)")?;
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(&font)
            .map_err(|e| format!("{}: {e}", font.display()))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| format!("{}: not a usable font", font.display()))?;
    let svg = prefix.with_extension("svg");
    let png = prefix.with_extension("png");
    draw(SVGBackend::new(&svg, (1000, 600)).into_drawing_area(), runs)?;
    draw(
        BitMapBackend::new(&png, (1000, 600)).into_drawing_area(),
        runs,
    )?;
    Ok(vec![svg, png])
}

fn draw<B: DrawingBackend>(
    area: DrawingArea<B, plotters::coord::Shift>,
    runs: &[Run],
) -> Result<(), String>
where
    B::ErrorType: 'static,
{
    let error = |e: DrawingAreaErrorKind<B::ErrorType>| e.to_string();
    area.fill(&WHITE).map_err(error)?;
    let highest = runs
        .iter()
        .flat_map(|r| r.curve.iter().map(|p| p.1))
        .fold(10.0_f64, f64::max)
        * 2.0;
    let scenario = runs.first().map_or("", |r| r.summary.scenario.as_str());
    let mut chart = ChartBuilder::on(&area)
        .caption(
            format!("Latency by percentile ({scenario})"),
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0_f64..5.0_f64, (1.0_f64..highest).log_scale())
        .map_err(error)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (us)")
        .x_labels(6)
        .x_label_formatter(&|x| match x.round() as i32 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            4 => "99.99%".into(),
            _ => "99.999%".into(),
        })
        .draw()
        .map_err(error)?;
    for (index, run) in runs.iter().enumerate() {
        let colour = Palette99::pick(index).to_rgba();
        let points: Vec<(f64, f64)> = run
            .curve
            .iter()
            .map(|&(p, v)| (nines(p), v.max(1.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(error)?
            .label(run.summary.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(error)?;
    area.present().map_err(error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(label: &str, rate: f64, p99: u64) -> Run {
        Run {
            summary: RunSummary {
                label: label.into(),
                scenario: "pairs".into(),
                qos: 0,
                messages_per_second: rate,
                lost: 0,
                latency_us: Latency {
                    p50: 10,
                    p90: 20,
                    p99,
                    p999: p99 * 2,
                    max: p99 * 3,
                },
            },
            curve: vec![(0.5, 10.0), (0.99, p99 as f64), (1.0, (p99 * 3) as f64)],
        }
    }

    #[test]
    fn table_gives_ratios_against_the_first_run() {
        let text = table(&[
            run("shardmq", 600_000.0, 100),
            run("mosquitto", 150_000.0, 400),
        ]);
        assert!(
            text.contains(
                "| shardmq | pairs | 0 | 600000 | 10 | 20 | 100 | 200 | 300 | 0 | 1.000x | 1.000x |"
            ),
            "{text}"
        );
        assert!(text.contains("| mosquitto | pairs | 0 | 150000 | 10 | 20 | 400 | 800 | 1200 | 0 | 0.250x | 4.000x |"), "{text}");
    }

    #[test]
    fn hgrm_lines_become_points() {
        let text = "       Value     Percentile TotalCount 1/(1-Percentile)\n\n      12.000 0.500000000000       50           2.00\n     900.000 0.990000000000       49         100.00\n#[Mean    =       20.000, StdDeviation   =        1.000]\n";
        assert_eq!(parse_hgrm(text), [(0.5, 12.0), (0.99, 900.0)]);
        assert!((nines(0.99) - 2.0).abs() < 1e-9 && nines(0.0) == 0.0);
    }

    #[test]
    fn chart_writes_svg_and_png() {
        if find_font().is_none() {
            panic!("no font: the test command installs fonts-dejavu-core");
        }
        let directory =
            std::env::temp_dir().join(format!("shardmq-compare-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let files = chart(
            &[run("a", 1.0, 100), run("b", 1.0, 300)],
            &directory.join("chart"),
        )
        .unwrap();
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(svg.contains("<svg") && svg.contains("polyline") && svg.contains("99.9%"));
        let png = std::fs::read(&files[1]).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
