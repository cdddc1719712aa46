//! plot.svg: one panel per scenario, median Mpps against frame size, a line
//! for vfrelay and one for DPDK (and one for OVS-DPDK in vm2vm).

use std::path::Path;

use plotters::prelude::*;

use super::report::{median, points, Point};
use super::Sample;

pub fn draw(path: &Path, samples: &[Sample]) -> Result<(), Box<dyn std::error::Error>> {
    let pts = points(samples);
    // Panels in first-measured order: (scenario, queue pairs).
    let mut panels: Vec<(String, usize)> = Vec::new();
    for p in &pts {
        if !panels
            .iter()
            .any(|(s, q)| *s == p.scenario && *q == p.queues)
        {
            panels.push((p.scenario.clone(), p.queues));
        }
    }
    let cols = 2;
    let rows = panels.len().div_ceil(cols).max(1);
    let root = SVGBackend::new(path, (1000, 330 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows, cols));
    for ((scenario, queues), area) in panels.iter().zip(areas.iter()) {
        let mine: Vec<&Point> = pts
            .iter()
            .filter(|p| p.scenario == *scenario && p.queues == *queues)
            .collect();
        let line = |f: fn(&Point) -> &Vec<f64>| -> Vec<(f64, f64)> {
            mine.iter()
                .map(|p| (p.size as f64, median(f(p))))
                .filter(|(_, y)| y.is_finite())
                .collect()
        };
        let (vf, dp, ovs) = (line(|p| &p.vfrelay), line(|p| &p.dpdk), line(|p| &p.ovs));
        let ymax = vf
            .iter()
            .chain(&dp)
            .chain(&ovs)
            .map(|(_, y)| *y)
            .fold(0.1f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{scenario}, {queues} queue pair(s)"),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1600f64, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("frame size (B)")
            .y_desc("Mpps (median)")
            .draw()?;
        let mut lines = vec![(vf, &RED, "vfrelay"), (dp, &BLUE, "DPDK net_vhost")];
        // Only vm2vm has a third back end.
        if !ovs.is_empty() {
            lines.push((ovs, &GREEN, "OVS-DPDK"));
        }
        for (data, color, name) in lines {
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(
                data.iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
