//! The SVG chart: for each workload, one bar per case; requests per second on the left, server CPU
//! per request on the right. Plain SVG written by hand (no fonts or rendering library needed).

use std::fmt::Write as _;

use crate::{Results, CASES, WORKLOADS};

const COLORS: [&str; 9] = [
    "#9e9e9e", "#616161", "#1565c0", "#42a5f5", "#ef6c00", "#c62828", "#6a1b9a", "#2e7d32",
    "#00838f",
];
const WIDTH: f64 = 1000.0;
const LABEL: f64 = 175.0;
const PANEL: f64 = 360.0;
const GAP: f64 = 50.0;
const BAR: f64 = 10.0;
const GROUP_GAP: f64 = 16.0;
const TOP: f64 = 58.0;

/// A round upper bound for an axis and its tick step.
fn axis(max: f64) -> (f64, f64) {
    let max = max.max(1e-9);
    let magnitude = 10f64.powf(max.log10().floor());
    let step = [0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|factor| factor * magnitude)
        .find(|step| max / step <= 5.0)
        .unwrap_or(magnitude * 10.0);
    ((max / step).ceil() * step, step)
}

fn short(value: f64) -> String {
    if value == 0.0 {
        "0".to_owned()
    } else if value >= 10_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value >= 1000.0 {
        format!("{:.1}k", value / 1000.0)
    } else if value >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub(crate) fn svg(results: &Results) -> String {
    let cases: Vec<usize> = (0..CASES.len())
        .filter(|&case| results.measurements.iter().any(|m| m.case == case))
        .collect();
    let groups = WORKLOADS.len() as f64;
    let group_height = cases.len() as f64 * BAR + GROUP_GAP;
    let chart_bottom = TOP + groups * group_height;
    let legend_top = chart_bottom + 30.0;
    let height = legend_top + cases.len() as f64 * 16.0 + 16.0;

    let max_rps = results
        .measurements
        .iter()
        .map(|m| m.wrk.requests_per_second())
        .fold(0.0, f64::max);
    let max_cpu = results
        .measurements
        .iter()
        .map(|m| m.cpu_app_us + m.cpu_aux_us)
        .fold(0.0, f64::max);
    let panels = [
        (LABEL, axis(max_rps), "requests/s (higher is better)"),
        (
            LABEL + PANEL + GAP,
            axis(max_cpu),
            "server CPU µs per request (lower is better)",
        ),
    ];

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14" font-weight="bold">mmap-session vs bare axum vs tower-sessions: wrk -t{} -c{}, median of {} × {} s, {} CPUs, one run</text>"#,
        results.cli.threads,
        results.cli.connections,
        results.rounds,
        results.duration_s,
        results.machine.nproc
    );
    for (left, (max, step), title) in panels {
        let _ = writeln!(
            svg,
            r#"<text x="{left}" y="{}" font-weight="bold">{}</text>"#,
            TOP - 22.0,
            escape(title)
        );
        let mut tick = 0.0;
        while tick <= max + step / 2.0 {
            let x = left + tick / max * PANEL;
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{chart_bottom}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle" fill="#555">{}</text>"##,
                TOP - 6.0,
                chart_bottom + 14.0,
                short(tick)
            );
            tick += step;
        }
    }
    for (group, workload) in WORKLOADS.iter().enumerate() {
        let group_top = TOP + group as f64 * group_height;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end" font-weight="bold">{}</text>"#,
            LABEL - 8.0,
            group_top + (group_height - GROUP_GAP) / 2.0 + 4.0,
            escape(workload.short())
        );
        for (row, &case) in cases.iter().enumerate() {
            let Some(m) = results
                .measurements
                .iter()
                .find(|m| m.case == case && m.workload == *workload)
            else {
                continue;
            };
            let y = group_top + row as f64 * BAR;
            let color = COLORS[case % COLORS.len()];
            let values = [m.wrk.requests_per_second(), m.cpu_app_us + m.cpu_aux_us];
            for ((left, (max, _), _), value) in panels.iter().zip(values) {
                let width = (value / max * PANEL).max(0.5);
                let _ = writeln!(
                    svg,
                    r##"<rect x="{left}" y="{y:.1}" width="{width:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="9" fill="#333">{}</text>"##,
                    BAR - 1.5,
                    left + width + 3.0,
                    y + BAR - 2.5,
                    short(value)
                );
            }
        }
    }
    for (row, &case) in cases.iter().enumerate() {
        let y = legend_top + row as f64 * 16.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{LABEL}" y="{y:.1}" width="12" height="12" fill="{}"/><text x="{}" y="{:.1}">{} {}</text>"#,
            COLORS[case % COLORS.len()],
            LABEL + 18.0,
            y + 10.0,
            CASES[case].id,
            escape(CASES[case].label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}
