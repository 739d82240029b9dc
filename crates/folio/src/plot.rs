//! `folio plot RUN_DIR...`: learning curves of runs (their `metrics.jsonl`) on one
//! chart, as SVG: population accuracy as dots joined by lines where a run measured
//! it, the cheaper per-round eval accuracy as a faint line; and a Markdown table of
//! the runs' figures on stdout. Runs on simulated devices (`folio simulate
//! --devices`) can be drawn against their simulated time or their devices'
//! compute instead of rounds (`--by`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use folio_server::RoundRecord;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Where Debian's fonts-dejavu-core puts the font the labels are laid out with.
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run folders (`folio serve --state-dir`, `folio simulate --state-dir`).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    #[arg(long, default_value = "curves.svg")]
    out: PathBuf,
    #[arg(
        long,
        default_value = "Federated Shakespeare: held-out accuracy per round"
    )]
    title: String,
    /// Only the rounds up to this one (to compare runs at one budget).
    #[arg(long)]
    max_round: Option<u64>,
    /// The accuracy whose first round the table reports (McMahan et al.'s 54%).
    #[arg(long, default_value_t = 0.54)]
    target: f64,
    /// What the x axis counts: rounds; client updates (runs of different cohort
    /// sizes on one budget); or, for runs on simulated devices (their
    /// clock.jsonl), simulated time or the characters their devices trained
    /// (wasted work included).
    #[arg(long, value_enum, default_value = "round")]
    by: Axis,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Axis {
    Round,
    Updates,
    Time,
    Compute,
}

impl Axis {
    fn describe(self) -> &'static str {
        match self {
            Axis::Round => "round",
            Axis::Updates => "client updates (thousands)",
            Axis::Time => "simulated time (minutes)",
            Axis::Compute => "characters trained by the devices (millions)",
        }
    }
}

/// Each round's place on the x axis (`None`: not on the chart).
fn x_positions(run: &Path, records: &[RoundRecord], by: Axis) -> anyhow::Result<Vec<Option<f64>>> {
    if by == Axis::Round {
        return Ok(records.iter().map(|r| Some(r.round as f64)).collect());
    }
    if by == Axis::Updates {
        let mut updates = 0;
        return Ok(records
            .iter()
            .map(|r| {
                updates += r.clients as u64;
                Some(updates as f64 / 1e3)
            })
            .collect());
    }
    let path = run.join("clock.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: --by time and --by compute need a run on simulated devices (folio simulate --population --devices)",
            path.display()
        )
    })?;
    let mut clock = std::collections::BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let entry: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {} is not a clock record", path.display(), i + 1))?;
        let round = entry["round"]
            .as_u64()
            .context("a clock record without its round")?;
        let x = match by {
            Axis::Time => entry["seconds"].as_f64().map(|s| s / 60.0),
            _ => entry["chars_trained"].as_f64().map(|c| c / 1e6),
        };
        clock.insert(round, x.context("a clock record without its figures")?);
    }
    Ok(records
        .iter()
        .map(|r| clock.get(&r.round).copied())
        .collect())
}

fn load_font() -> anyhow::Result<()> {
    let bytes = FONTS
        .iter()
        .find_map(|path| std::fs::read(path).ok())
        .context("no DejaVu Sans font: install Debian's fonts-dejavu-core")?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("DejaVu Sans is not a usable font"))
}

pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    load_font()?;
    let mut xs = Vec::new();
    let runs: Vec<(String, Vec<RoundRecord>)> = args
        .runs
        .iter()
        .map(|dir| {
            let name = dir.file_name().map_or_else(
                || dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            let mut records = folio_host::state::run_history(dir)?;
            records.retain(|r| args.max_round.is_none_or(|max| r.round <= max));
            xs.push(x_positions(dir, &records, args.by)?);
            Ok((name, records))
        })
        .collect::<anyhow::Result<_>>()?;
    let rounds = runs
        .iter()
        .flat_map(|(_, h)| h.iter().map(|r| r.round))
        .max()
        .unwrap_or(1)
        .max(1);
    let x_max = xs
        .iter()
        .flatten()
        .flatten()
        .copied()
        .fold(0.0, f64::max)
        .max(1e-9);
    let accuracies = runs.iter().flat_map(|(_, h)| {
        h.iter()
            .flat_map(|r| [Some(r.eval_accuracy), r.population_accuracy])
            .flatten()
    });
    let finite: Vec<f64> = accuracies.filter(|a| a.is_finite()).collect();
    anyhow::ensure!(!finite.is_empty(), "no finite accuracy in these runs");
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.1).max(0.01);

    let root = SVGBackend::new(&args.out, (960, 540)).into_drawing_area();
    let draw = |err: DrawingAreaErrorKind<std::io::Error>| anyhow::anyhow!("drawing: {err}");
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&args.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (lo - pad).max(0.0)..(hi + pad).min(1.0))
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc(args.by.describe())
        .y_desc("accuracy")
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(draw)?;
    for (i, ((name, records), xs)) in runs.iter().zip(&xs).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let faint = color.mix(0.3);
        let placed = || {
            records
                .iter()
                .zip(xs)
                .filter_map(|(r, x)| Some((*x)?).map(|x| (x, r)))
        };
        let eval = placed()
            .filter(|(_, r)| r.eval_accuracy.is_finite())
            .map(|(x, r)| (x, r.eval_accuracy));
        chart
            .draw_series(LineSeries::new(eval, faint.stroke_width(1)))
            .map_err(draw)?
            .label(format!("{name}: eval accuracy (sampled clients)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], faint.stroke_width(2))
            });
        let population: Vec<(f64, f64)> = placed()
            .filter_map(|(x, r)| Some((x, r.population_accuracy.filter(|a| a.is_finite())?)))
            .collect();
        if !population.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    population.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(draw)?;
            chart
                .draw_series(
                    population
                        .into_iter()
                        .map(|p| Circle::new(p, 4, color.filled())),
                )
                .map_err(draw)?
                .label(format!("{name}: population accuracy"))
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    println!(
        "{} runs, {rounds} rounds: {}\n",
        runs.len(),
        args.out.display()
    );
    print!("{}", summary(&runs, args.target));
    Ok(())
}

fn population_points(records: &[RoundRecord]) -> Vec<(u64, f64)> {
    records
        .iter()
        .filter_map(|r| Some((r.round, r.population_accuracy.filter(|a| a.is_finite())?)))
        .collect()
}

/// One row a run: its rounds, its last population accuracy, the first round
/// whose population accuracy reached `target`, and the time its rounds took.
fn summary(runs: &[(String, Vec<RoundRecord>)], target: f64) -> String {
    let percent = target * 100.0;
    let mut table = format!(
        "| run | rounds | population accuracy (round) | first round ≥ {percent:.0}% | time |\n| --- | --- | --- | --- | --- |\n"
    );
    for (name, records) in runs {
        let points = population_points(records);
        let last = points.last().map_or("—".to_owned(), |(round, acc)| {
            format!("{acc:.4} ({round})")
        });
        let reached = points
            .iter()
            .find(|(_, acc)| *acc >= target)
            .map_or("not yet".to_owned(), |(round, _)| round.to_string());
        let seconds: f64 = records.iter().map(|r| r.seconds).sum();
        let time = if seconds < 3600.0 {
            format!("{:.0} min", seconds / 60.0)
        } else {
            format!("{:.1} h", seconds / 3600.0)
        };
        table += &format!(
            "| {name} | {} | {last} | {reached} | {time} |\n",
            records.last().map_or(0, |r| r.round),
        );
    }
    table
}
