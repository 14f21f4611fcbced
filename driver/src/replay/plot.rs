//! The replay's plots: for one run, the money spent and the work done over time, one line per
//! policy, as an SVG.

use std::path::Path;

use plotters::prelude::*;

use super::sim::Outcome;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct PlotError {
    pub path: String,
    pub message: String,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(120, 120, 120),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

/// Draws `outcomes`' timelines into `path` (an SVG): cost above, work done below.
pub fn draw(path: &Path, title: &str, outcomes: &[Outcome]) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let hours = outcomes
        .iter()
        .flat_map(|o| o.timeline.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let cost = outcomes
        .iter()
        .flat_map(|o| o.timeline.iter().map(|p| p.1))
        .fold(1.0f64, f64::max);
    let work = outcomes
        .iter()
        .flat_map(|o| o.timeline.iter().map(|p| p.2))
        .fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, (960, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 18))
        .map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(360);
    type Value = fn(&(f64, f64, f64)) -> f64;
    let panels: [(&DrawingArea<_, _>, &str, f64, Value); 2] = [
        (&top, "dollars spent", cost * 1.05, |p| p.1),
        (&bottom, "hours of work done", work * 1.05, |p| p.2),
    ];
    for (area, label, max, value) in panels {
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..hours * 1.02, 0f64..max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("hours since the job started")
            .y_desc(label)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, o) in outcomes.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    o.timeline.iter().map(|p| (p.0, value(p))),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(o.policy.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
