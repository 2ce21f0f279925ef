//! The suite's chart: median throughput and ping-pong latency percentiles
//! per system (TCP suites), or datagram rates and RTTs per workload (UDP
//! suite), as an SVG (plotters' SVG backend writes `<text>` elements, so
//! no font files are read).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

use crate::common::Result;

const COLORS: [RGBColor; 3] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
];

fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    y_desc: &str,
    systems: &[String],
    series: &[(&str, Vec<f64>)],
) -> Result<()> {
    let n = systems.len().max(1);
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc(y_desc)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|e| e.to_string())?;
    let k = series.len().max(1) as f64;
    let w = 0.8 / k;
    for (j, (name, vals)) in series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        chart
            .draw_series(vals.iter().enumerate().map(|(i, &v)| {
                let x0 = i as f64 + 0.1 + j as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.92, v)], color.filled())
            }))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        chart
            .draw_series(
                vals.iter()
                    .enumerate()
                    .filter(|(_, v)| **v > 0.0)
                    .map(|(i, &v)| {
                        let x = i as f64 + 0.1 + (j as f64 + 0.46) * w;
                        Text::new(
                            crate::compare::fmt_num(v),
                            (x, v + ymax * 0.01),
                            ("sans-serif", 9)
                                .into_font()
                                .color(&BLACK)
                                .pos(Pos::new(HPos::Center, VPos::Bottom)),
                        )
                    }),
            )
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| e.to_string())?;
    // System names under their groups, on the drawing area itself.
    for (i, s) in systems.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        let (ox, oy) = area.get_base_pixel();
        area.draw(&Text::new(
            s.clone(),
            (px - ox, py - oy + 8),
            ("sans-serif", 12)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn title(doc: &Value) -> String {
    format!(
        "loadgen compare --suite {} ({}, git {}): medians of {} reps",
        doc["suite"].as_str().unwrap_or("?"),
        doc["date"].as_str().unwrap_or("?"),
        doc["system"]["git"].as_str().unwrap_or("?"),
        doc["params"]["reps"]
    )
}

/// The UDP suite: datagrams/s at both sizes, RTT p50 and p99 at 64 B,
/// each with a bar per association count.
fn draw_udp(doc: &Value, path: &Path) -> Result<()> {
    let systems = crate::compare::system_names(doc);
    let get = |key: String, scale: f64| -> Vec<f64> {
        systems
            .iter()
            .map(|s| doc["medians"][s][&key].as_f64().unwrap_or(0.0) * scale)
            .collect()
    };
    let series = |size: u32, metric: &str, scale: f64| -> Vec<(&'static str, Vec<f64>)> {
        [("1 assoc", 1), ("8 assocs", 8), ("2000 assocs", 2000)]
            .into_iter()
            .map(|(name, n)| (name, get(format!("udp{size}x{n}_{metric}"), scale)))
            .collect()
    };
    let root = SVGBackend::new(path, (1200, 860)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(&title(doc), ("sans-serif", 16))
        .map_err(|e| e.to_string())?;
    let panels = root.split_evenly((2, 2));
    panel(
        &panels[0],
        "Datagrams/s echoed, 64 B",
        "thousands/s",
        &systems,
        &series(64, "dps", 1e-3),
    )?;
    panel(
        &panels[1],
        "Datagrams/s echoed, 1400 B",
        "thousands/s",
        &systems,
        &series(1400, "dps", 1e-3),
    )?;
    panel(
        &panels[2],
        "RTT p50, 64 B",
        "µs",
        &systems,
        &series(64, "rtt_p50_us", 1.0),
    )?;
    panel(
        &panels[3],
        "RTT p99, 64 B",
        "µs",
        &systems,
        &series(64, "rtt_p99_us", 1.0),
    )?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// Draws the chart of a suite document to `path`.
pub fn draw(doc: &Value, path: &Path) -> Result<()> {
    if doc["suite"].as_str().is_some_and(|s| s.starts_with("udp")) {
        return draw_udp(doc, path);
    }
    let systems = crate::compare::system_names(doc);
    let get = |key: &str| -> Vec<f64> {
        systems
            .iter()
            .map(|s| doc["medians"][s][key].as_f64().unwrap_or(0.0))
            .collect()
    };
    let root = SVGBackend::new(path, (1200, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(&title(doc), ("sans-serif", 16))
        .map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(600);
    panel(
        &left,
        "TCP throughput",
        "Gbit/s",
        &systems,
        &[
            ("1 stream", get("tput1_gbps")),
            ("16 streams", get("tput16_gbps")),
            ("bidir 1+1", get("bidir_gbps")),
        ],
    )?;
    panel(
        &right,
        "64 B ping-pong RTT, 1 connection",
        "µs",
        &systems,
        &[
            ("p50", get("rtt_p50_us")),
            ("p90", get("rtt_p90_us")),
            ("p99", get("rtt_p99_us")),
        ],
    )?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn draws_an_svg() {
        let doc = json!({
            "suite": "ci", "date": "2026-11-24", "system": {"git": "abc"}, "params": {"reps": 3},
            "systems": [{"name": "direct"}, {"name": "ringsocks-splice"}],
            "medians": {
                "direct": {"tput1_gbps": 22.0, "tput16_gbps": 30.0, "bidir_gbps": 25.0,
                           "rtt_p50_us": 13.0, "rtt_p90_us": 15.0, "rtt_p99_us": 20.0},
                "ringsocks-splice": {"tput1_gbps": 14.0, "rtt_p50_us": 100.0},
            },
        });
        let p = std::env::temp_dir().join(format!("loadgen-chart-{}.svg", std::process::id()));
        draw(&doc, &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("ringsocks-splice") && svg.contains("16 streams"));
    }

    #[test]
    fn draws_the_udp_svg() {
        let doc = json!({
            "suite": "udp", "date": "2026-11-24", "system": {"git": "abc"}, "params": {"reps": 3},
            "systems": [{"name": "ringsocks"}, {"name": "direct"}, {"name": "dante"}],
            "medians": {
                "direct": {"udp64x1_dps": 85000.0, "udp64x8_dps": 166000.0, "udp64x1_rtt_p50_us": 11.0},
                "dante": {"udp64x2000_dps": 20000.0, "udp1400x8_dps": 29000.0},
            },
        });
        let p = std::env::temp_dir().join(format!("loadgen-chart-udp-{}.svg", std::process::id()));
        draw(&doc, &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("2000 assocs") && svg.contains("RTT p99, 64 B"));
    }
}
