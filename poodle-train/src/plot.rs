//! `poodle-train plot`: PNG curves of one or more runs' `metrics.jsonl`, one panel per
//! logged term, runs overlaid in the same colour in every panel, for a user without
//! TensorBoard (or on a login node without a browser).
//!
//! Text needs a TrueType font, read at run time (plotters draws glyphs through ab_glyph and
//! ships none): `POODLE_PLOT_FONT`, else DejaVu Sans where Debian, Fedora or Arch put it.

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The panels, in reading order: the `metrics.jsonl` field and the panel's title.
pub const PANELS: &[(&str, &str)] = &[
    ("total", "loss (total)"),
    ("dense", "dense loss"),
    ("pooled", "pooled loss"),
    ("dense_ab", "dense a->b"),
    ("dense_ba", "dense b->a"),
    ("pooled_ab", "pooled a->b"),
    ("pooled_ba", "pooled b->a"),
    ("lr", "learning rate"),
    ("dense_mask_fraction", "dense mask fraction"),
    ("proj_std", "projection std"),
    ("grad_norm", "gradient norm"),
    ("pairs_per_s", "pairs/s"),
];

/// Panel size in pixels and panels per row.
const PANEL_W: u32 = 480;
const PANEL_H: u32 = 300;
const COLUMNS: usize = 3;

/// Run colours, distinct on white and for the common colour-vision deficiencies (Okabe-Ito).
pub const RUN_COLOURS: &[(u8, u8, u8)] = &[
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (230, 159, 0),
    (86, 180, 233),
    (0, 0, 0),
];

/// One run's curves: for each field, (step, value) by increasing step.
#[derive(Debug)]
pub struct RunCurves {
    pub label: String,
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
}

/// Reads `RUN_DIR/metrics.jsonl` (or a metrics file itself). A step logged twice (a run that
/// stopped after logging and before its checkpoint, then resumed) keeps its later line, so a
/// resumed run draws one curve. Non-finite values are left out.
pub fn read_run(path: &Path) -> Result<RunCurves> {
    let file = if path.is_dir() {
        path.join("metrics.jsonl")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("{}: cannot read the run's metrics", file.display()))?;
    let mut by_step: BTreeMap<u64, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON line", file.display(), i + 1))?;
        let (Some(step), Some(obj)) = (v.get("step").and_then(|s| s.as_u64()), v.as_object())
        else {
            bail!(
                "{}:{}: not a metrics object with a step",
                file.display(),
                i + 1
            );
        };
        by_step.insert(step, obj.clone());
    }
    if by_step.is_empty() {
        bail!("{}: no logged steps", file.display());
    }
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (step, obj) in &by_step {
        for (key, _) in PANELS {
            if let Some(x) = obj
                .get(*key)
                .and_then(|x| x.as_f64())
                .filter(|x| x.is_finite())
            {
                series
                    .entry(key.to_string())
                    .or_default()
                    .push((*step as f64, x));
            }
        }
    }
    Ok(RunCurves {
        label: run_label(path),
        series,
    })
}

fn run_label(path: &Path) -> String {
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(path)
    };
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Plots the runs into one PNG at `out`; returns its size. Panels no run has data for are
/// left out; a run with no value for a panel's term is absent from that panel only.
pub fn plot_runs(runs: &[PathBuf], out: &Path) -> Result<(u32, u32)> {
    if runs.is_empty() {
        bail!("plot: name at least one run folder (or metrics.jsonl)");
    }
    let curves = runs
        .iter()
        .map(|r| read_run(r))
        .collect::<Result<Vec<_>>>()?;
    let panels: Vec<(&str, &str)> = PANELS
        .iter()
        .copied()
        .filter(|(k, _)| curves.iter().any(|c| c.series.contains_key(*k)))
        .collect();
    ensure_font()?;
    let rows = panels.len().div_ceil(COLUMNS);
    let (w, h) = (PANEL_W * COLUMNS as u32, PANEL_H * rows as u32);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    draw_panels(&mut rgb, (w, h), rows, &panels, &curves)
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", out.display()))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    poodle_common::flowmath::write_png_rgb(out, w, h, &rgb)
        .with_context(|| format!("{}", out.display()))?;
    Ok((w, h))
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw_panels(
    rgb: &mut [u8],
    size: (u32, u32),
    rows: usize,
    panels: &[(&str, &str)],
    curves: &[RunCurves],
) -> DrawResult {
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows, COLUMNS));
    for (area, (key, title)) in areas.iter().zip(panels) {
        draw_panel(area, key, title, curves)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    key: &str,
    title: &str,
    curves: &[RunCurves],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let points = || curves.iter().filter_map(|c| c.series.get(key)).flatten();
    let (x0, x1) = padded(points().map(|p| p.0), 0.0);
    let (y0, y1) = padded(points().map(|p| p.1), 0.05);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .margin_right(20)
        .x_label_area_size(26)
        .y_label_area_size(62)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_labels(5)
        .y_labels(5)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| tick_label(*v))
        .label_style(("sans-serif", 12))
        .draw()?;
    for (i, c) in curves.iter().enumerate() {
        let Some(series) = c.series.get(key) else {
            continue;
        };
        let (r, g, b) = RUN_COLOURS[i % RUN_COLOURS.len()];
        let colour = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(
                series.iter().copied(),
                colour.stroke_width(2),
            ))?
            .label(c.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
    }
    if curves.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()?;
    }
    Ok(())
}

/// A short tick label: plain decimals for everyday magnitudes, exponents for the rest
/// (learning rates, projection std).
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (0.01..10_000.0).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

/// The range of `xs` widened by `pad` of its span on both sides; never empty.
fn padded(xs: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let span = hi - lo;
    if !span.is_finite() || span <= 0.0 {
        let d = lo.abs().max(1e-9) * 0.05;
        return (lo - d, lo + d);
    }
    (lo - pad * span, hi + pad * span)
}

/// Where a TrueType font is looked for, after `POODLE_PLOT_FONT`.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a font as plotters' "sans-serif" once per process.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let from_env = std::env::var_os("POODLE_PLOT_FONT").map(PathBuf::from);
        let tried: Vec<PathBuf> = from_env
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        let Some((path, bytes)) = tried
            .iter()
            .find_map(|p| std::fs::read(p).ok().map(|b| (p, b)))
        else {
            return Err(format!(
                "plot needs a TrueType font: set POODLE_PLOT_FONT, or install DejaVu Sans \
                 (Debian: apt-get install fonts-dejavu-core); looked in {}",
                tried
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a TrueType font plotters can read", path.display()))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_line_of_a_step_wins_and_non_finite_values_are_dropped() {
        let dir = std::env::temp_dir().join(format!("poodle-plot-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines = [
            r#"{"step":1,"total":3.0,"lr":0.1}"#,
            r#"{"step":2,"total":2.0,"lr":0.1}"#,
            r#"{"step":2,"total":1.5,"lr":0.1}"#,
            r#"{"step":3,"total":NaN}"#,
        ];
        // NaN is not JSON: the reader names the file and line.
        std::fs::write(dir.as_path().join("metrics.jsonl"), lines.join("\n")).unwrap();
        let err = read_run(dir.as_path()).unwrap_err();
        assert!(format!("{err:#}").contains("metrics.jsonl:4"), "{err:#}");
        std::fs::write(dir.as_path().join("metrics.jsonl"), lines[..3].join("\n")).unwrap();
        let c = read_run(dir.as_path()).unwrap();
        assert_eq!(c.series["total"], vec![(1.0, 3.0), (2.0, 1.5)]);
        assert_eq!(c.series["lr"].len(), 2);
        assert!(!c.series.contains_key("dense"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(8.0), "8");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(5e-4), "5.0e-4");
        assert_eq!(tick_label(0.0), "0");
    }

    #[test]
    fn padded_range_is_never_empty() {
        assert_eq!(padded([1.0, 3.0].into_iter(), 0.5), (0.0, 4.0));
        let (lo, hi) = padded([2.0].into_iter(), 0.05);
        assert!(lo < 2.0 && hi > 2.0);
        let (lo, hi) = padded([0.0, 0.0].into_iter(), 0.05);
        assert!(lo < 0.0 && hi > 0.0);
    }
}
