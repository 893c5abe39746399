//! Pictures of a run: `training.svg` and `training.png` in the output folder, drawn from
//! `metrics.jsonl` and `events.jsonl` alone (so `st-tune plot DIR` redraws them, also while the
//! run is going), and a sweep's metric against each searched key.
//!
//! plotters draws the SVG; resvg rasterises it to PNG with a font compiled into the binary
//! (DejaVu Sans, `assets/fonts`), so the PNG looks the same on a machine without fonts.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::train::report::read_jsonl;

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
const WIDTH: u32 = 1000;
const PANEL_HEIGHT: u32 = 250;
const MIB: f64 = (1u64 << 20) as f64;

/// (step, loss, lr, samples/s, memory in use MiB, memory limit MiB) of one logged step.
type StepRow = (f64, f64, f64, f64, f64, Option<f64>);

/// One run's curves, read from its output folder.
#[derive(Default)]
struct Run {
    steps: Vec<StepRow>,
    /// (step, value) of the dev evaluations, and the figure's name.
    evals: Vec<(f64, f64)>,
    eval_name: Option<String>,
    /// Steps with an out-of-memory event, and the memory in use then (MiB).
    ooms: Vec<(f64, f64)>,
    /// With several training sets (`"dataset"` on the step lines): each set's name and its
    /// steps' (step, loss), sets in the order they first appear. Empty for one set.
    set_losses: Vec<(String, Vec<(f64, f64)>)>,
}

fn read_run(dir: &Path) -> Result<Run> {
    let metrics = dir.join("metrics.jsonl");
    let mut run = Run::default();
    for l in read_jsonl(&metrics)? {
        let step = l["step"].as_f64().unwrap_or(0.0);
        if let Some(loss) = l["loss"].as_f64() {
            if let Some(set) = l["dataset"].as_str() {
                match run.set_losses.iter_mut().find(|(name, _)| name == set) {
                    Some((_, points)) => points.push((step, loss)),
                    None => run.set_losses.push((set.to_string(), vec![(step, loss)])),
                }
            }
            run.steps.push((
                step,
                loss,
                l["lr"].as_f64().unwrap_or(0.0),
                l["samples_per_s"].as_f64().unwrap_or(0.0),
                l["memory_in_use"].as_f64().unwrap_or(0.0) / MIB,
                l["memory_limit"].as_f64().map(|b| b / MIB),
            ));
        } else if l.get("label").is_some() {
            // The figure that picks the best model by default: Spearman, cosine AP for
            // labelled pairs, NDCG@10 for retrieval.
            for name in ["spearman", "cosine_ap", "ndcg@10"] {
                if let Some(v) = l[name].as_f64() {
                    run.evals.push((step, v));
                    run.eval_name = Some(name.to_string());
                    break;
                }
            }
        }
    }
    if run.steps.is_empty() {
        return Err(Error::data(
            &metrics,
            0,
            "holds no training steps yet: nothing to plot (is this a st-tune output folder?)",
        ));
    }
    for e in read_jsonl(&dir.join("events.jsonl"))? {
        if e["event"] == "oom" {
            let step = e["step"].as_f64().unwrap_or(0.0);
            run.ooms
                .push((step, e["memory_in_use"].as_f64().unwrap_or(0.0) / MIB));
        }
    }
    Ok(run)
}

/// Draws `DIR/training.svg` and `DIR/training.png`; returns the PNG's path.
pub fn training(dir: &Path) -> Result<PathBuf> {
    let run = read_run(dir)?;
    let panels = 4 + usize::from(!run.evals.is_empty());
    let mut svg = String::new();
    draw_training(&run, panels, &mut svg).map_err(|e| Error::Internal(format!("plot: {e}")))?;
    write_both(dir, "training", &svg)
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw_training(run: &Run, panels: usize, out: &mut String) -> DrawResult {
    let height = PANEL_HEIGHT * panels as u32;
    let root = SVGBackend::with_string(out, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels, 1));
    let last = run.steps.last().map_or(1.0, |s| s.0).max(1.0);
    let x = 0f64..last;
    let pick = |f: fn(&StepRow) -> f64| -> Vec<(f64, f64)> {
        run.steps.iter().map(|s| (s.0, f(s))).collect()
    };
    let mut area = areas.iter();
    let mut next = || area.next().expect("one area per panel");
    if run.set_losses.is_empty() {
        line_panel(
            next(),
            "training loss",
            "loss",
            x.clone(),
            &pick(|s| s.1),
            &BLUE,
        )?;
    } else {
        set_loss_panel(next(), x.clone(), &run.set_losses)?;
    }
    line_panel(
        next(),
        "learning rate",
        "lr",
        x.clone(),
        &pick(|s| s.2),
        &GREEN,
    )?;
    if let Some(name) = &run.eval_name {
        line_panel(
            next(),
            &format!("dev {name}"),
            name,
            x.clone(),
            &run.evals,
            &MAGENTA,
        )?;
    }
    line_panel(
        next(),
        "speed",
        "samples/s",
        x.clone(),
        &pick(|s| s.3),
        &CYAN,
    )?;
    memory_panel(next(), run, x)?;
    root.present()?;
    Ok(())
}

fn range_of(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.08).max(hi.abs() * 1e-3).max(1e-12);
    (lo - pad)..(hi + pad)
}

/// A panel's axes over optimizer steps, with its title, mesh and labels drawn.
fn step_axes<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> std::result::Result<
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    Box<dyn std::error::Error>,
> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|v| step_label(*v))
        .y_label_formatter(&|v| short(*v))
        .draw()?;
    Ok(chart)
}

fn line_panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    x: std::ops::Range<f64>,
    points: &[(f64, f64)],
    color: &RGBColor,
) -> DrawResult {
    let y = range_of(points.iter().map(|p| p.1));
    let mut chart = step_axes(area, title, y_label, x, y)?;
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        color.stroke_width(2),
    ))?;
    if points.len() <= 60 {
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    Ok(())
}

/// Colours of the per-set loss curves, in turn (a set after the last takes the first again).
const SET_COLORS: [RGBColor; 6] = [
    BLUE,
    RGBColor(230, 120, 0),
    RGBColor(0, 150, 70),
    MAGENTA,
    RGBColor(120, 80, 40),
    BLACK,
];

/// The training loss of a run with several sets: one curve per set, labelled by its name
/// (each step's loss is that of one set's batch, so one mixed curve would zigzag between sets).
fn set_loss_panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    x: std::ops::Range<f64>,
    sets: &[(String, Vec<(f64, f64)>)],
) -> DrawResult {
    let y = range_of(sets.iter().flat_map(|(_, p)| p.iter().map(|p| p.1)));
    let mut chart = step_axes(area, "training loss per set", "loss", x, y)?;
    for (i, (name, points)) in sets.iter().enumerate() {
        let color = SET_COLORS[i % SET_COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        if points.len() <= 60 {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn memory_panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    run: &Run,
    x: std::ops::Range<f64>,
) -> DrawResult {
    let used: Vec<(f64, f64)> = run.steps.iter().map(|s| (s.0, s.4)).collect();
    let limit = run.steps.iter().rev().find_map(|s| s.5);
    let y_values = used
        .iter()
        .map(|p| p.1)
        .chain(limit)
        .chain(run.ooms.iter().map(|o| o.1))
        .chain([0.0]);
    let y = range_of(y_values);
    let mut chart = step_axes(area, "memory in use", "MiB", x.clone(), y)?;
    chart
        .draw_series(LineSeries::new(used, BLACK.stroke_width(2)))?
        .label("in use at the end of the step")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    if let Some(l) = limit {
        chart
            .draw_series(LineSeries::new(
                [(x.start, l), (x.end, l)],
                RED.stroke_width(1),
            ))?
            .label("memory.limit")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(1)));
    }
    if !run.ooms.is_empty() {
        chart
            .draw_series(
                run.ooms
                    .iter()
                    .map(|&(s, m)| TriangleMarker::new((s, m), 7, RED.filled())),
            )?
            .label("out of memory (recovered)")
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, RED.filled()));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    Ok(())
}

/// A sweep's metric against each searched key: one panel per key, a point per trial with a
/// result. Numeric keys on a numeric axis (log for keys spanning two decades or more), other
/// keys one column per value. Writes `DIR/sweep.svg` and `DIR/sweep.png`.
pub fn sweep(
    dir: &Path,
    metric: &str,
    trials: &[(Vec<(String, toml::Value)>, f64)],
) -> Result<PathBuf> {
    let mut keys: Vec<&String> = trials
        .iter()
        .flat_map(|(params, _)| params.iter().map(|(k, _)| k))
        .collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() || trials.is_empty() {
        return Err(Error::sweep(
            dir,
            "no trial has a result yet: nothing to plot",
        ));
    }
    let mut svg = String::new();
    draw_sweep(metric, &keys, trials, &mut svg)
        .map_err(|e| Error::Internal(format!("plot: {e}")))?;
    write_both(dir, "sweep", &svg)
}

fn draw_sweep(
    metric: &str,
    keys: &[&String],
    trials: &[(Vec<(String, toml::Value)>, f64)],
    out: &mut String,
) -> DrawResult {
    let height = PANEL_HEIGHT * keys.len() as u32;
    let root = SVGBackend::with_string(out, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let y = range_of(trials.iter().map(|t| t.1));
    for (area, key) in root.split_evenly((keys.len(), 1)).iter().zip(keys) {
        let points: Vec<(toml::Value, f64)> = trials
            .iter()
            .filter_map(|(p, m)| {
                p.iter()
                    .find(|(k, _)| k == *key)
                    .map(|(_, v)| (v.clone(), *m))
            })
            .collect();
        let numbers: Option<Vec<(f64, f64)>> = points
            .iter()
            .map(|(v, m)| Some((v.as_float().or(v.as_integer().map(|i| i as f64))?, *m)))
            .collect();
        let title = format!("{metric} against {key}");
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80);
        match numbers {
            Some(nums) if nums.iter().all(|n| n.0 > 0.0) && spans_decades(&nums) => {
                // Padding in log space: a linear pad would reach 0.
                let (lo, hi) = nums
                    .iter()
                    .fold((f64::INFINITY, 0f64), |(a, b), n| (a.min(n.0), b.max(n.0)));
                let x = (lo / 1.5)..(hi * 1.5);
                let chart = builder.build_cartesian_2d(x.log_scale(), y.clone())?;
                scatter(chart, key, metric, &nums)?;
            }
            Some(nums) => {
                let x = range_of(nums.iter().map(|n| n.0));
                let chart = builder.build_cartesian_2d(x, y.clone())?;
                scatter(chart, key, metric, &nums)?;
            }
            None => {
                let mut labels: Vec<String> = points.iter().map(|(v, _)| v.to_string()).collect();
                labels.sort();
                labels.dedup();
                let at = |v: &toml::Value| {
                    labels.iter().position(|l| *l == v.to_string()).unwrap_or(0) as f64
                };
                let mut chart =
                    builder.build_cartesian_2d(-0.5f64..(labels.len() as f64 - 0.5), y.clone())?;
                let label_of = |v: &f64| {
                    let i = v.round();
                    if (v - i).abs() < 1e-9 && i >= 0.0 {
                        labels.get(i as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                };
                chart
                    .configure_mesh()
                    .x_desc(key.as_str())
                    .y_desc(metric)
                    .x_labels(labels.len().max(2) * 2 + 1)
                    .x_label_formatter(&label_of)
                    .label_style(("sans-serif", 14))
                    .draw()?;
                chart.draw_series(
                    points
                        .iter()
                        .map(|(v, m)| Circle::new((at(v), *m), 5, BLUE.filled())),
                )?;
            }
        }
    }
    root.present()?;
    Ok(())
}

/// One point per trial, on a numeric key axis the caller built (linear or log).
fn scatter<X>(
    mut chart: ChartContext<'_, SVGBackend<'_>, Cartesian2d<X, RangedCoordf64>>,
    key: &str,
    metric: &str,
    nums: &[(f64, f64)],
) -> DrawResult
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(key)
        .y_desc(metric)
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|v| short(*v))
        .draw()?;
    chart.draw_series(nums.iter().map(|&p| Circle::new(p, 5, BLUE.filled())))?;
    Ok(())
}

fn spans_decades(nums: &[(f64, f64)]) -> bool {
    let (lo, hi) = nums
        .iter()
        .fold((f64::INFINITY, 0f64), |(a, b), n| (a.min(n.0), b.max(n.0)));
    hi / lo >= 100.0
}

/// Steps are whole numbers: no label between two.
fn step_label(v: f64) -> String {
    if (v - v.round()).abs() < 1e-6 {
        format!("{}", v.round() as i64)
    } else {
        String::new()
    }
}

/// Axis labels short enough to read: 2e-5, 0.12, 1.5k.
fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Writes `NAME.svg` and `NAME.png` in `dir`, each atomically.
fn write_both(dir: &Path, name: &str, svg: &str) -> Result<PathBuf> {
    crate::atomic::write_file(&dir.join(format!("{name}.svg")), svg.as_bytes())?;
    let png = dir.join(format!("{name}.png"));
    crate::atomic::write_file(&png, &rasterize(svg)?)?;
    Ok(png)
}

fn rasterize(svg: &str) -> Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_font_data(FONT.to_vec());
    db.set_sans_serif_family("DejaVu Sans");
    let tree = usvg::Tree::from_str(svg, &opt)
        .map_err(|e| Error::Internal(format!("plot: the SVG does not parse: {e}")))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| Error::Internal("plot: empty picture".into()))?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
        .encode_png()
        .map_err(|e| Error::Internal(format!("plot: PNG encoding: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A metrics.jsonl of 6 steps, alternating between `sets` when there are several.
    fn metrics(dir: &Path, sets: &[&str]) {
        let mut text = String::new();
        for step in 1..=6 {
            let mut line = serde_json::json!({
                "step": step, "epoch": 0, "loss": 1.0 / step as f64, "lr": 1e-4,
                "samples_per_s": 50.0, "micro_batch_size": 8, "memory_in_use": 1 << 28,
            });
            if sets.len() > 1 {
                line["dataset"] = sets[step % sets.len()].into();
            }
            text.push_str(&format!("{line}\n"));
        }
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    }

    /// The number of curves the SVG draws (lines 2 px wide through more than two points: not
    /// grid lines, not legend marks), and the SVG.
    fn drawn(dir: &Path) -> (usize, String) {
        training(dir).unwrap();
        let svg = std::fs::read_to_string(dir.join("training.svg")).unwrap();
        let curves = svg
            .split("<polyline")
            .skip(1)
            .filter(|p| {
                let tag = &p[..p.find('>').unwrap()];
                let points = tag.split("points=\"").nth(1).unwrap_or("");
                let points = &points[..points.find('"').unwrap_or(0)];
                tag.contains("stroke-width=\"2\"") && points.split_whitespace().count() > 2
            })
            .count();
        (curves, svg)
    }

    /// Whether the SVG writes `text` as a text element of its own.
    fn shows(svg: &str, text: &str) -> bool {
        svg.contains(&format!(">\n{text}\n</text>")) || svg.contains(&format!(">{text}</text>"))
    }

    #[test]
    fn several_sets_get_one_loss_curve_each_labelled_and_one_set_is_drawn_as_before() {
        let one = tempfile::tempdir().unwrap();
        metrics(one.path(), &["only"]);
        let (curves, svg) = drawn(one.path());
        // loss, lr, speed, memory in use.
        assert_eq!(curves, 4);
        assert!(shows(&svg, "training loss") && !svg.contains("per set"));

        let two = tempfile::tempdir().unwrap();
        metrics(two.path(), &["sts-b", "qa-pairs"]);
        let (curves, svg) = drawn(two.path());
        assert_eq!(curves, 5, "a loss curve per set");
        for label in ["training loss per set", "sts-b", "qa-pairs"] {
            assert!(shows(&svg, label), "no {label} in the SVG");
        }
        assert!(two.path().join("training.png").exists());
    }

    #[test]
    fn short_labels() {
        assert_eq!(short(2e-5), "2.0e-5");
        assert_eq!(short(0.125), "0.125");
        assert_eq!(short(1500.0), "1.5k");
        assert_eq!(short(0.0), "0");
    }
}
