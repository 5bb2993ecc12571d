//! `latency.svg`: latency over the run, per second, hand-written SVG (no plotting crate).
//!
//! Three panels sharing the time axis: event-to-push p50 and p99 of the events sent in each
//! second (log scale, with the `late_ms` threshold dashed), request p50 and p99 of the requests
//! started in each second (log scale), and the event rate (target dashed, sent) with the pushes
//! received per second (linear).
//!
//! The plot takes plain data ([`Plot`]): it knows nothing of the report it is drawn for, so the
//! report calls the plot and not the other way round.

use std::fmt::Write as _;

const WIDTH: f64 = 960.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const PANEL: f64 = 190.0;
const GAP: f64 = 45.0;
const P50: &str = "#1f77b4";
const P99: &str = "#d62728";
const RATE: &str = "#2ca02c";
const PUSHES: &str = "#9467bd";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A vertical scale for one panel.
struct Scale {
    log: bool,
    min: f64,
    max: f64,
    top: f64,
}

impl Scale {
    fn log(values: impl Iterator<Item = f64>, top: f64) -> Scale {
        let (mut lo, mut hi) = (f64::MAX, f64::MIN);
        for v in values.filter(|v| *v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if lo > hi {
            (lo, hi) = (0.1, 10.0);
        }
        let min = 10f64.powf(lo.max(0.001).log10().floor());
        let max = 10f64.powf(hi.log10().ceil()).max(min * 10.0);
        Scale { log: true, min, max, top }
    }

    fn linear(values: impl Iterator<Item = f64>, top: f64) -> Scale {
        let hi = values.fold(0.0f64, f64::max);
        let step = nice_step(hi.max(1.0) / 4.0);
        Scale { log: false, min: 0.0, max: (hi / step).ceil().max(1.0) * step, top }
    }

    fn y(&self, v: f64) -> f64 {
        let share = if self.log {
            (v.max(self.min).log10() - self.min.log10()) / (self.max.log10() - self.min.log10())
        } else {
            (v - self.min) / (self.max - self.min)
        };
        self.top + PANEL * (1.0 - share.clamp(0.0, 1.0))
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut t = self.min;
            let mut out = Vec::new();
            while t <= self.max * 1.0001 {
                out.push(t);
                t *= 10.0;
            }
            out
        } else {
            let step = nice_step(self.max / 4.0);
            (0..=((self.max / step).round() as usize)).map(|i| i as f64 * step).collect()
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let power = 10f64.powf(raw.max(1e-9).log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * power).find(|s| *s >= raw).unwrap_or(10.0 * power)
}

fn label(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// An SVG path through the points, broken where a value is missing.
fn path(points: impl Iterator<Item = (f64, Option<f64>)>, scale: &Scale, x: &dyn Fn(f64) -> f64) -> String {
    let mut d = String::new();
    let mut pen_down = false;
    for (t, v) in points {
        match v {
            Some(v) => {
                let _ = write!(d, "{}{:.1} {:.1} ", if pen_down { "L" } else { "M" }, x(t), scale.y(v));
                pen_down = true;
            }
            None => pen_down = false,
        }
    }
    d
}

fn axes(out: &mut String, scale: &Scale, title: &str, unit: &str, seconds: f64, x: &dyn Fn(f64) -> f64) {
    let bottom = scale.top + PANEL;
    let right = WIDTH - RIGHT;
    let _ =
        writeln!(out, r#"<text x="{LEFT}" y="{:.1}" font-weight="bold">{}</text>"#, scale.top - 10.0, escape(title));
    for tick in scale.ticks() {
        let y = scale.y(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 6.0,
            y + 4.0,
            label(tick)
        );
    }
    let step = nice_step(seconds / 10.0).max(1.0);
    let mut t = 0.0;
    while t <= seconds + 1e-9 {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{bottom}" x2="{0:.1}" y2="{1:.1}" stroke="#888"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##,
            x(t),
            bottom + 4.0,
            bottom + 17.0,
            t
        );
        t += step;
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{}" height="{PANEL}" fill="none" stroke="#444"/><text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">{unit}</text>"##,
        scale.top,
        right - LEFT,
        scale.top + PANEL / 2.0,
        scale.top + PANEL / 2.0
    );
}

fn line(out: &mut String, d: &str, colour: &str, dashed: bool) {
    if !d.is_empty() {
        let dash = if dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(out, r#"<path d="{d}" fill="none" stroke="{colour}" stroke-width="1.8"{dash}/>"#);
    }
}

fn legend(out: &mut String, top: f64, entries: &[(&str, &str, bool)]) {
    for (i, (name, colour, dashed)) in entries.iter().enumerate() {
        let y = top + 14.0 + i as f64 * 18.0;
        let x = WIDTH - RIGHT + 12.0;
        let dash = if *dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            x + 22.0,
            x + 28.0,
            y + 4.0,
            escape(name)
        );
    }
}

/// What the picture shows: one run, second by second.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plot {
    /// The run's name, in the title.
    pub title: String,
    /// Event-to-push latency above which a delivery counts as late (the dashed line).
    pub late_threshold_ms: f64,
    /// The seconds of the load, in order.
    pub seconds: Vec<Second>,
}

/// One second of the plot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Second {
    /// Seconds since the load started.
    pub t: u64,
    /// Event-to-push quantiles of the events sent in this second.
    pub event_to_push_p50_ms: Option<f64>,
    pub event_to_push_p99_ms: Option<f64>,
    /// Latency quantiles of the requests started in this second.
    pub request_p50_ms: Option<f64>,
    pub request_p99_ms: Option<f64>,
    /// The scenario's event rate at this second.
    pub target_events_per_s: f64,
    pub events_sent: u64,
    /// Pushes received in this second.
    pub pushes: u64,
}

/// The whole picture for one run.
pub fn latency(plot: &Plot) -> String {
    let tl = &plot.seconds;
    let seconds = (tl.len() as f64).max(1.0);
    let x = |t: f64| LEFT + (WIDTH - RIGHT - LEFT) * (t / seconds);
    // Each second's value is drawn at its middle.
    let mid = |t: u64| t as f64 + 0.5;
    let height = TOP + 3.0 * (PANEL + GAP) + 10.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">liverec-load: {} ({} s, time axis in seconds)</text>"#,
        escape(&plot.title),
        tl.len()
    );

    let e2p = Scale::log(
        tl.iter()
            .flat_map(|s| [s.event_to_push_p50_ms, s.event_to_push_p99_ms])
            .flatten()
            .chain([plot.late_threshold_ms]),
        TOP + 10.0,
    );
    axes(&mut out, &e2p, "event to push, by second the event was sent", "ms (log)", seconds, &x);
    let late = e2p.y(plot.late_threshold_ms);
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{late:.1}" x2="{}" y2="{late:.1}" stroke="#ff7f0e" stroke-dasharray="3 3"/>"##,
        WIDTH - RIGHT
    );
    line(&mut out, &path(tl.iter().map(|s| (mid(s.t), s.event_to_push_p50_ms)), &e2p, &x), P50, false);
    line(&mut out, &path(tl.iter().map(|s| (mid(s.t), s.event_to_push_p99_ms)), &e2p, &x), P99, false);
    let late_name = format!("late: {} ms", plot.late_threshold_ms);
    legend(&mut out, e2p.top, &[("p50", P50, false), ("p99", P99, false), (late_name.as_str(), "#ff7f0e", true)]);

    let req =
        Scale::log(tl.iter().flat_map(|s| [s.request_p50_ms, s.request_p99_ms]).flatten(), TOP + 10.0 + PANEL + GAP);
    axes(&mut out, &req, "request latency, by second the request started", "ms (log)", seconds, &x);
    line(&mut out, &path(tl.iter().map(|s| (mid(s.t), s.request_p50_ms)), &req, &x), P50, false);
    line(&mut out, &path(tl.iter().map(|s| (mid(s.t), s.request_p99_ms)), &req, &x), P99, false);
    legend(&mut out, req.top, &[("p50", P50, false), ("p99", P99, false)]);

    let rates = Scale::linear(
        tl.iter().flat_map(|s| [s.target_events_per_s, s.events_sent as f64, s.pushes as f64]),
        TOP + 10.0 + 2.0 * (PANEL + GAP),
    );
    axes(&mut out, &rates, "events and pushes per second", "per second", seconds, &x);
    line(&mut out, &path(tl.iter().map(|s| (mid(s.t), Some(s.target_events_per_s))), &rates, &x), RATE, true);
    line(&mut out, &path(tl.iter().map(|s| (mid(s.t), Some(s.events_sent as f64))), &rates, &x), RATE, false);
    line(&mut out, &path(tl.iter().map(|s| (mid(s.t), Some(s.pushes as f64))), &rates, &x), PUSHES, false);
    legend(
        &mut out,
        rates.top,
        &[("target events/s", RATE, true), ("events sent/s", RATE, false), ("pushes received/s", PUSHES, false)],
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_and_steps() {
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(1200.0), 2000.0);
        let s = Scale::log([0.4, 37.0].into_iter(), 0.0);
        assert_eq!((s.min, s.max), (0.1, 100.0));
        assert_eq!(s.ticks().len(), 4);
        assert!((s.y(100.0) - 0.0).abs() < 1e-9 && (s.y(0.1) - PANEL).abs() < 1e-9);
        let l = Scale::linear([0.0, 4200.0].into_iter(), 0.0);
        assert_eq!(l.max, 6000.0);
        assert_eq!(l.ticks(), vec![0.0, 2000.0, 4000.0, 6000.0]);
    }

    #[test]
    fn paths_break_on_gaps() {
        let s = Scale::linear([10.0].into_iter(), 0.0);
        let d = path([(0.0, Some(1.0)), (1.0, None), (2.0, Some(2.0)), (3.0, Some(3.0))].into_iter(), &s, &|t| t);
        assert_eq!(d.matches('M').count(), 2);
        assert_eq!(d.matches('L').count(), 1);
        assert_eq!(escape("a<b&"), "a&lt;b&amp;");
    }

    #[test]
    fn the_picture_has_a_title_three_panels_and_a_line_per_series() {
        let second = |t: u64| Second {
            t,
            event_to_push_p50_ms: Some(2.0),
            event_to_push_p99_ms: Some(9.0),
            request_p50_ms: Some(1.0),
            request_p99_ms: None,
            target_events_per_s: 100.0,
            events_sent: 98,
            pushes: 120,
        };
        let plot = Plot { title: "a<b".into(), late_threshold_ms: 250.0, seconds: (0..3).map(second).collect() };
        let svg = latency(&plot);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("liverec-load: a&lt;b (3 s"), "the title is escaped");
        assert_eq!(svg.matches(r##"fill="none" stroke="#444""##).count(), 3, "three panels");
        // p50 and p99 event to push, p50 requests (its p99 is missing), target, sent, pushes.
        assert_eq!(svg.matches("stroke-width=\"1.8\"").count(), 6);
    }
}
