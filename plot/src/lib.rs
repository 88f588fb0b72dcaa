//! Self-contained SVG line charts, written once for v4's reports: `v4 bench-infer --contexts`'s scaling
//! panels and `v4 validate`'s per-layer error curve.
//!
//! A [`Chart`] is a row of [`Panel`]s; a panel has a linear or logarithmic scale per axis, tick labels
//! along x, optional grid lines at each power of ten along y, and [`Series`] drawn as polylines (dashed
//! for guides) with a marker and a tooltip per point.

use std::fmt::Write;

/// How an axis maps values to positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Logarithmic: equal ratios take equal distances (values are clamped to at least 1e-12).
    Log,
}

impl Scale {
    fn map(self, v: f64) -> f64 {
        match self {
            Scale::Linear => v,
            Scale::Log => v.max(1e-12).log10(),
        }
    }
}

/// One line of a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend entry (none when empty).
    pub label: String,
    /// An SVG colour.
    pub color: String,
    pub points: Vec<(f64, f64)>,
    /// A guide: dashed, without markers.
    pub dashed: bool,
    /// Print each point's y value beside its marker.
    pub value_labels: bool,
}

impl Series {
    /// A solid line with a marker per point.
    pub fn line(label: &str, color: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.to_string(),
            color: color.to_string(),
            points,
            dashed: false,
            value_labels: false,
        }
    }

    /// A dashed guide line without markers.
    pub fn guide(label: &str, color: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            dashed: true,
            ..Self::line(label, color, points)
        }
    }

    /// Prints each point's value beside its marker.
    pub fn with_value_labels(self) -> Self {
        Self {
            value_labels: true,
            ..self
        }
    }
}

/// One plot area.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x: Scale,
    pub y: Scale,
    /// Labels written under the x axis at these x values.
    pub x_ticks: Vec<(f64, String)>,
    /// Values the y range must reach besides the series' (a floor for small errors, say).
    pub y_include: Vec<f64>,
    /// A grid line and a `1eN` label at each power of ten of the y range (log y only).
    pub y_decades: bool,
    pub series: Vec<Series>,
}

impl Panel {
    /// An empty panel with the given title and scales.
    pub fn new(title: &str, x: Scale, y: Scale) -> Self {
        Self {
            title: title.to_string(),
            x,
            y,
            x_ticks: Vec::new(),
            y_include: Vec::new(),
            y_decades: false,
            series: Vec::new(),
        }
    }

    /// The panel's value ranges in scale space, `(x_lo, x_hi, y_lo, y_hi)`; None without points.
    fn ranges(&self) -> Option<(f64, f64, f64, f64)> {
        let points = self.series.iter().flat_map(|s| &s.points);
        let xs: Vec<f64> = points.clone().map(|p| self.x.map(p.0)).collect();
        let ys = points.map(|p| p.1).chain(self.y_include.iter().copied());
        let ys: Vec<f64> = ys.map(|y| self.y.map(y)).collect();
        let (x_lo, x_hi) = min_max(&xs)?;
        let (mut y_lo, mut y_hi) = min_max(&ys)?;
        if self.y_decades && self.y == Scale::Log {
            (y_lo, y_hi) = (y_lo.floor(), y_hi.ceil().max(y_lo.floor() + 1.0));
        }
        Some((x_lo, x_hi, y_lo, y_hi))
    }
}

/// A row of panels with an optional title.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub panel_width: f64,
    pub panel_height: f64,
    pub panels: Vec<Panel>,
}

/// Space around each panel, for titles and tick labels.
const MARGIN: f64 = 55.0;
/// Space between a panel's frame and its data.
const INSET: f64 = 10.0;

impl Chart {
    /// The chart as a standalone `<svg>` element.
    pub fn svg(&self) -> String {
        let n = self.panels.len().max(1) as f64;
        let width = n * (self.panel_width + MARGIN) + MARGIN;
        let height = self.panel_height + 2.0 * MARGIN + 20.0;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
             font-family=\"sans-serif\" font-size=\"11\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        );
        if !self.title.is_empty() {
            let _ = writeln!(
                s,
                "<text x=\"{MARGIN}\" y=\"20\" font-size=\"14\">{}</text>",
                escape(&self.title)
            );
        }
        for (i, panel) in self.panels.iter().enumerate() {
            let frame = Frame {
                x0: MARGIN + i as f64 * (self.panel_width + MARGIN),
                y0: MARGIN + 10.0,
                w: self.panel_width,
                h: self.panel_height,
            };
            frame.draw(&mut s, panel);
        }
        s.push_str("</svg>\n");
        s
    }
}

/// Where a panel sits.
struct Frame {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
}

impl Frame {
    fn draw(&self, s: &mut String, panel: &Panel) {
        let Frame { x0, y0, w, h } = *self;
        let _ = writeln!(
            s,
            "<rect x=\"{x0}\" y=\"{y0}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#888\"/>\n\
             <text x=\"{x0}\" y=\"{}\">{}</text>",
            y0 - 6.0,
            escape(&panel.title)
        );
        let Some((x_lo, x_hi, y_lo, y_hi)) = panel.ranges() else {
            return;
        };
        let px = |x: f64| x0 + INSET + (w - 2.0 * INSET) * (panel.x.map(x) - x_lo) / (x_hi - x_lo).max(1e-9);
        let py =
            |y: f64| y0 + h - INSET - (h - 2.0 * INSET) * (panel.y.map(y) - y_lo) / (y_hi - y_lo).max(1e-9);
        if panel.y_decades && panel.y == Scale::Log {
            for e in (y_lo as i32)..=(y_hi as i32) {
                let yy = py(10f64.powi(e));
                let _ = writeln!(
                    s,
                    "<line x1=\"{x0}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/>\
                     <text x=\"{}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">1e{e}</text>",
                    x0 + w,
                    x0 - 4.0,
                    yy + 3.0
                );
            }
        }
        for (x, label) in &panel.x_ticks {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>",
                px(*x),
                y0 + h + 14.0,
                escape(label)
            );
        }
        let legend = panel.series.iter().filter(|series| !series.label.is_empty());
        for (k, series) in legend.enumerate() {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{}\" text-anchor=\"end\">{}</text>",
                x0 + w - 6.0,
                y0 + 14.0 + 13.0 * k as f64,
                series.color,
                escape(&series.label)
            );
        }
        for series in &panel.series {
            Self::series(s, series, &px, &py);
        }
    }

    fn series(s: &mut String, series: &Series, px: &dyn Fn(f64) -> f64, py: &dyn Fn(f64) -> f64) {
        let path: Vec<String> = series
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let dash = if series.dashed {
            " stroke-dasharray=\"4 3\""
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{}\"{dash}/>",
            path.join(" "),
            series.color,
            if series.dashed { 1 } else { 2 }
        );
        if series.dashed {
            return;
        }
        for &(x, y) in &series.points {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"><title>{y:.3e}</title></circle>",
                px(x),
                py(y),
                series.color
            );
            if series.value_labels {
                let _ = write!(
                    s,
                    "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\">{}</text>",
                    px(x) + 4.0,
                    py(y) - 5.0,
                    short(y)
                );
            }
            s.push('\n');
        }
    }
}

fn min_max(values: &[f64]) -> Option<(f64, f64)> {
    let finite = values.iter().copied().filter(|v| v.is_finite());
    finite.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// A value in three significant figures or so, for labels.
pub fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Escapes text for SVG.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `(cx, cy)` of every marker, in drawing order.
    fn markers(svg: &str) -> Vec<(f64, f64)> {
        svg.split("<circle cx=\"")
            .skip(1)
            .map(|rest| {
                let cx: f64 = rest.split('"').next().unwrap().parse().unwrap();
                let cy: f64 = rest
                    .split("cy=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                (cx, cy)
            })
            .collect()
    }

    fn chart(x: Scale, y: Scale, points: Vec<(f64, f64)>) -> String {
        let mut panel = Panel::new("p", x, y);
        panel.series.push(Series::line("data", "#123", points));
        Chart {
            title: "a < b".into(),
            panel_width: 220.0,
            panel_height: 120.0,
            panels: vec![panel],
        }
        .svg()
    }

    #[test]
    fn log_axes_space_equal_ratios_equally_and_linear_axes_equal_steps() {
        // A power law y = x^2 on log-log axes is a straight line: equal x steps, y steps twice as tall
        // relative to the range; the first point sits at the lower-left inset, the last at the upper-right.
        let svg = chart(
            Scale::Log,
            Scale::Log,
            vec![(1.0, 1.0), (10.0, 100.0), (100.0, 1e4)],
        );
        let m = markers(&svg);
        assert_eq!(m.len(), 3);
        let (x0, y0) = (MARGIN + INSET, MARGIN + 10.0 + 120.0 - INSET);
        assert_eq!(m[0], (x0, y0));
        assert_eq!(m[2], (MARGIN + 220.0 - INSET, MARGIN + 10.0 + INSET));
        assert!((m[1].0 - (m[0].0 + m[2].0) / 2.0).abs() < 0.051);
        assert!((m[1].1 - (m[0].1 + m[2].1) / 2.0).abs() < 0.051);

        let svg = chart(
            Scale::Linear,
            Scale::Linear,
            vec![(0.0, 0.0), (1.0, 3.0), (4.0, 12.0)],
        );
        let m = markers(&svg);
        assert_eq!(m.len(), 3);
        let step = (220.0 - 2.0 * INSET) / 4.0;
        assert!((m[1].0 - (m[0].0 + step)).abs() < 0.051);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt; b"));
    }

    #[test]
    fn decades_cover_the_range_and_included_values() {
        let mut panel = Panel::new("errors", Scale::Linear, Scale::Log);
        panel.y_decades = true;
        panel.y_include = vec![1e-8];
        panel
            .series
            .push(Series::line("", "#c33", vec![(0.0, 3e-6), (1.0, 2e-3)]));
        panel.x_ticks = vec![(0.0, "L0".into()), (1.0, "head".into())];
        let svg = Chart {
            title: String::new(),
            panel_width: 300.0,
            panel_height: 200.0,
            panels: vec![panel],
        }
        .svg();
        // The range runs from the included 1e-8 up to the decade above the largest point (2e-3): 1e-2.
        let decades: Vec<&str> = svg.matches(">1e-").collect();
        assert_eq!(decades.len(), 7, "1e-8 .. 1e-2: {svg}");
        assert!(svg.contains(">1e-8<") && svg.contains(">1e-2<"));
        assert!(!svg.contains(">1e-9<") && !svg.contains(">1e-1<"));
        assert!(svg.contains(">L0<") && svg.contains(">head<"));
        assert_eq!(markers(&svg).len(), 2);
    }

    #[test]
    fn guides_are_dashed_without_markers_and_empty_panels_draw_only_their_frame() {
        let mut panel = Panel::new("g", Scale::Log, Scale::Log);
        panel
            .series
            .push(Series::guide("x^1", "#4a4", vec![(1.0, 1.0), (8.0, 8.0)]));
        let svg = Chart {
            title: String::new(),
            panel_width: 100.0,
            panel_height: 100.0,
            panels: vec![panel, Panel::new("empty", Scale::Linear, Scale::Linear)],
        }
        .svg();
        assert_eq!(svg.matches("stroke-dasharray").count(), 1);
        assert!(markers(&svg).is_empty());
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains(">empty<"));
    }
}
