//! SVG plots of sweep results: bad rate against offered load, one line per policy.

use std::path::Path;

use plotters::prelude::*;

use crate::sweep::SweepResult;

/// The bad-rate axis ends here: the region around the 1 % bound is what the plot is for;
/// worse points are drawn at the top edge.
const Y_MAX_PERCENT: f64 = 10.0;

/// Draws one SVG per workload of `result` into `dir`; returns the files written.
pub fn draw(result: &SweepResult, dir: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    let mut workloads: Vec<&str> = Vec::new();
    for cell in &result.cells {
        if !workloads.contains(&cell.workload.as_str()) {
            workloads.push(&cell.workload);
        }
    }
    let mut written = Vec::new();
    for workload in workloads {
        let cells: Vec<_> = result
            .cells
            .iter()
            .filter(|c| c.workload == workload && !c.curve.is_empty())
            .collect();
        if cells.is_empty() {
            continue;
        }
        let path = dir.join(format!("{workload}.svg"));
        let x_max = cells
            .iter()
            .flat_map(|c| c.curve.iter().map(|p| p.offered_rps))
            .fold(1.0, f64::max);
        let root = SVGBackend::new(&path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{workload}: bad rate against offered load"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max * 1.02, 0.0..Y_MAX_PERCENT)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("offered load (req/s)")
            .y_desc("bad rate (%), average over models")
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, cell) in cells.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> = cell
                .curve
                .iter()
                .map(|p| (p.offered_rps, p.bad_rate.min(Y_MAX_PERCENT)))
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(cell.policy.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .draw_series(LineSeries::new(vec![(0.0, 1.0), (x_max * 1.02, 1.0)], BLACK.mix(0.4)))
            .map_err(|e| e.to_string())?
            .label("1 % bound")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.4)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
        drop(chart);
        drop(root);
        written.push(path);
    }
    Ok(written)
}
