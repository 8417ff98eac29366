//! The SVG chart: for each workload, one bar per case; requests per second on the left, server CPU
//! per request on the right. Plain SVG written by hand (no fonts or rendering library needed).

use std::fmt::Write as _;

use crate::{Results, CASES, WORKLOADS};

pub(crate) const COLORS: [&str; 10] = [
    "#9e9e9e", "#616161", "#1565c0", "#42a5f5", "#ef6c00", "#c62828", "#6a1b9a", "#2e7d32",
    "#00838f", "#ad1457",
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

/// One line of a line chart.
pub(crate) struct Series {
    pub(crate) label: String,
    pub(crate) color: &'static str,
    /// (x, y), x > 0 (the x axis is logarithmic).
    pub(crate) points: Vec<(f64, f64)>,
}

/// One panel of a line chart: y against a logarithmic x.
pub(crate) struct Panel {
    pub(crate) title: String,
    pub(crate) x_title: String,
    pub(crate) series: Vec<Series>,
    /// Where the x ticks go, and their labels.
    pub(crate) x_ticks: Vec<(f64, String)>,
}

const LINE_PANEL_WIDTH: f64 = 400.0;
const LINE_PANEL_HEIGHT: f64 = 260.0;
const LINE_LEFT: f64 = 60.0;

/// Panels side by side, each with its own axes, and one legend under them (the series of the
/// first panel name the colours).
pub(crate) fn lines(title: &str, panels: &[Panel]) -> String {
    let width = LINE_LEFT + panels.len() as f64 * (LINE_PANEL_WIDTH + GAP + LINE_LEFT);
    let legend_top = TOP + LINE_PANEL_HEIGHT + 45.0;
    let legend_rows = panels.first().map_or(0, |panel| panel.series.len());
    let height = legend_top + legend_rows as f64 * 16.0 + 16.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (index, panel) in panels.iter().enumerate() {
        let left = LINE_LEFT + index as f64 * (LINE_PANEL_WIDTH + GAP + LINE_LEFT);
        let bottom = TOP + LINE_PANEL_HEIGHT;
        let xs = || {
            panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.0))
        };
        let (x_min, x_max) = xs().fold((f64::MAX, f64::MIN), |(low, high), x| {
            (low.min(x.ln()), high.max(x.ln()))
        });
        let x_span = (x_max - x_min).max(1e-9);
        let x_at = |x: f64| left + (x.ln() - x_min) / x_span * LINE_PANEL_WIDTH;
        let y_max = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max);
        let (y_max, step) = axis(y_max);
        let y_at = |y: f64| bottom - y / y_max * LINE_PANEL_HEIGHT;
        let _ = writeln!(
            svg,
            r#"<text x="{left}" y="{}" font-weight="bold">{}</text>"#,
            TOP - 14.0,
            escape(&panel.title)
        );
        let mut tick = 0.0;
        while tick <= y_max + step / 2.0 {
            let y = y_at(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
                left + LINE_PANEL_WIDTH,
                left - 6.0,
                y + 4.0,
                short(tick)
            );
            tick += step;
        }
        for (x, label) in &panel.x_ticks {
            let x = x_at(*x);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{bottom}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
                bottom + 14.0,
                escape(label)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + LINE_PANEL_WIDTH / 2.0,
            bottom + 32.0,
            escape(&panel.x_title)
        );
        for series in &panel.series {
            let path: Vec<String> = series
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", x_at(x), y_at(y)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                path.join(" "),
                series.color
            );
            for &(x, y) in &series.points {
                let _ = writeln!(
                    svg,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="9" fill="#333">{}</text>"##,
                    x_at(x),
                    y_at(y),
                    series.color,
                    x_at(x) + 4.0,
                    y_at(y) - 4.0,
                    short(y)
                );
            }
        }
    }
    if let Some(panel) = panels.first() {
        for (row, series) in panel.series.iter().enumerate() {
            let y = legend_top + row as f64 * 16.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{LINE_LEFT}" y="{y:.1}" width="12" height="12" fill="{}"/><text x="{}" y="{:.1}">{}</text>"#,
                series.color,
                LINE_LEFT + 18.0,
                y + 10.0,
                escape(&series.label)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
