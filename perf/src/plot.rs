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

/// Draws GPUs paid for over time, one line per autoscaled run (runs whose lines stay within a
/// quarter GPU of each other share one, labelled `a ~ b`), beside the offered load (grey, right axis), with the start of the
/// measured part marked, into `path`.
pub fn draw_gpus_over_time(
    outcomes: &[crate::autoscale::Outcome],
    title: &str,
    bench_start_s: f64,
    path: &Path,
) -> Result<(), String> {
    let seconds = outcomes.iter().map(|o| o.timeline.len()).max().unwrap_or(0).max(1);
    let offered: Vec<(f64, f64)> = outcomes
        .first()
        .map(|o| {
            o.timeline
                .iter()
                .enumerate()
                .map(|(i, s)| (i as f64, s.arrivals as f64))
                .collect()
        })
        .unwrap_or_default();
    let rps_max = offered.iter().map(|p| p.1).fold(1.0, f64::max) * 1.05;
    let gpus_max = outcomes
        .iter()
        .map(|o| f64::from(o.summary.gpu_count))
        .fold(1.0, f64::max)
        + 1.0;
    // One line per distinct timeline of GPUs paid, labelled with every run that drew it.
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for o in outcomes.iter().filter(|o| o.run.signal.is_some()) {
        let points: Vec<(f64, f64)> = o
            .timeline
            .iter()
            .enumerate()
            .map(|(i, s)| (i as f64, s.paid_gpus))
            .collect();
        let same = |p: &Vec<(f64, f64)>| {
            p.len() == points.len() && p.iter().zip(&points).all(|(a, b)| (a.1 - b.1).abs() < 0.25)
        };
        match lines.iter_mut().find(|(_, p)| same(p)) {
            Some((label, _)) => *label += &format!(" ~ {}", o.run),
            None => lines.push((o.run.to_string(), points)),
        }
    }
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: GPUs paid for and offered load"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .right_y_label_area_size(64)
        .build_cartesian_2d(0.0..seconds as f64, 0.0..gpus_max)
        .map_err(|e| e.to_string())?
        .set_secondary_coord(0.0..seconds as f64, 0.0..rps_max);
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("GPUs paid for (online, starting or draining)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .configure_secondary_axes()
        .y_desc("offered load (req/s)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    let grey = BLACK.mix(0.3);
    chart
        .draw_secondary_series(LineSeries::new(offered, grey.stroke_width(1)))
        .map_err(|e| e.to_string())?
        .label("offered load (right axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey.stroke_width(1)));
    let marker = BLACK.mix(0.6);
    chart
        .draw_series(LineSeries::new(
            vec![(bench_start_s, 0.0), (bench_start_s, gpus_max)],
            marker.stroke_width(1),
        ))
        .map_err(|e| e.to_string())?
        .label("measured from here")
        .legend(move |(x, y)| PathElement::new(vec![(x + 9, y - 6), (x + 9, y + 6)], marker.stroke_width(1)));
    for (i, (label, points)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
