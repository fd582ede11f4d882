//! Drawing a [`Figure`]: panels, axes, error bars, markers and the legend, with plotters on its
//! SVG and bitmap backends, text in the embedded DejaVu Sans.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::color;
use crate::error::{Error, Result};

/// DejaVu Sans 2.37 (license: `data/fonts/LICENSE-DejaVu.txt`).
const FONT_TTF: &[u8] = include_bytes!("../../../data/fonts/DejaVuSans.ttf");
/// The family every text style names: plotters' default, so its own labels use the font too.
const FAMILY: &str = "sans-serif";

/// Register the embedded font with plotters (once per process).
fn register_font() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    if *OK.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT_TTF).is_ok()) {
        Ok(())
    } else {
        Err(Error::Invalid("plots: the embedded DejaVu Sans font did not load".into()))
    }
}

fn rgb(method: &str) -> RGBColor {
    let [r, g, b] = color(method);
    RGBColor(r, g, b)
}

/// Marker shapes: the full cache's is the star; the other methods take the first four in turn,
/// in `compact::METHODS` order (unknown names by a sum of their bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Marker {
    Circle,
    Square,
    Triangle,
    Diamond,
    Star,
}

fn marker(method: &str) -> Marker {
    if method == "full" {
        return Marker::Star;
    }
    let i = crate::compact::METHODS.iter().position(|m| *m == method).unwrap_or_else(|| method.bytes().map(usize::from).sum());
    [Marker::Circle, Marker::Square, Marker::Triangle, Marker::Diamond][i % 4]
}

/// The outline of a marker of radius `r` pixels around (0, 0), as a polygon (every shape is one,
/// so a series of markers has a single element type).
fn marker_outline(m: Marker, r: f64) -> Vec<(i32, i32)> {
    let ring = |n: usize, radius: &dyn Fn(usize) -> f64, phase: f64| -> Vec<(i32, i32)> {
        (0..n)
            .map(|k| {
                let a = phase + std::f64::consts::TAU * k as f64 / n as f64;
                let q = radius(k);
                ((q * a.cos()).round() as i32, (q * a.sin()).round() as i32)
            })
            .collect()
    };
    let up = -std::f64::consts::FRAC_PI_2;
    match m {
        Marker::Circle => ring(24, &|_| r, 0.0),
        Marker::Square => ring(4, &|_| 1.25 * r, std::f64::consts::FRAC_PI_4),
        Marker::Triangle => ring(3, &|_| 1.4 * r, up),
        Marker::Diamond => ring(4, &|_| 1.35 * r, up),
        Marker::Star => ring(10, &|k| if k % 2 == 0 { 2.0 * r } else { 0.85 * r }, up),
    }
}

/// How a method is written in legends.
fn legend_name(method: &str) -> String {
    if method == "full" {
        "full cache".into()
    } else {
        method.to_string()
    }
}

/// A drawn point: x, y and the interval [lo, hi] (NaN ends: no error bar).
#[derive(Debug, Clone, Copy)]
pub(super) struct Pt {
    pub(super) x: f64,
    pub(super) y: f64,
    pub(super) lo: f64,
    pub(super) hi: f64,
}

impl Pt {
    fn bar(&self, log: bool) -> Option<(f64, f64)> {
        (self.lo.is_finite() && self.hi > self.lo && (!log || self.lo > 0.0)).then_some((self.lo, self.hi))
    }
}

/// One method's points in a panel.
pub(super) struct Series {
    pub(super) method: String,
    pub(super) pts: Vec<Pt>,
}

/// The full cache in a panel: a horizontal line (with its interval as a band) or one star.
pub(super) enum Reference {
    Line(Pt),
    Star(Pt),
}

/// One panel: its titles, axes and what it draws.
pub(super) struct Panel {
    pub(super) title: String,
    pub(super) x_desc: String,
    pub(super) y_desc: String,
    /// Ticks on the x axis with their labels (None: powers of ten and their multiples).
    pub(super) x_ticks: Option<Vec<(f64, String)>>,
    pub(super) log_y: bool,
    /// A y axis fixed to [0, 1] (accuracy).
    pub(super) unit_y: bool,
    pub(super) series: Vec<Series>,
    pub(super) reference: Option<Reference>,
}

/// A figure: a title, panels in a grid of at most four columns and the legend below them.
/// Build one with [`metric_figure`](super::metric_figure) or
/// [`pareto_figure`](super::pareto_figure); write it with [`Figure::svg`] and
/// [`Figure::write_png`].
pub struct Figure {
    pub(super) title: String,
    pub(super) panels: Vec<Panel>,
    /// Methods in legend order (the full cache included where it is drawn).
    pub(super) legend: Vec<String>,
    /// The full cache is a star (Pareto) rather than a dashed line.
    pub(super) full_star: bool,
}

const PANEL_W: u32 = 330;
const PANEL_H: u32 = 270;
const TITLE_H: u32 = 34;
/// Height of one legend row, and its top and bottom margins together.
const LEGEND_ROW: u32 = 21;
const LEGEND_PAD: u32 = 16;
const LEGEND_FONT: f64 = 12.5;
/// Panel margins left and right, and the width of the y tick labels and axis title.
const MARGIN_L: u32 = 6;
const MARGIN_R: u32 = 16;
const Y_LABELS_W: u32 = 62;
const TICK_FONT: f64 = 12.0;
const TITLE_FONT: f64 = 16.0;

impl Figure {
    fn grid(&self) -> (usize, usize) {
        let cols = self.panels.len().clamp(1, 4);
        (self.panels.len().max(1).div_ceil(cols), cols)
    }

    /// Width of one legend entry (a line sample and the longest name) and entries per row.
    fn legend_layout(&self) -> (u32, usize) {
        let entry = 34 + 8 + 26 + self.legend.iter().map(|m| text_width(&legend_name(m), LEGEND_FONT)).max().unwrap_or(0);
        let width = self.width() - 20;
        (entry, ((width / entry) as usize).clamp(1, self.legend.len().max(1)))
    }

    fn legend_h(&self) -> u32 {
        let per_row = self.legend_layout().1;
        LEGEND_PAD + LEGEND_ROW * self.legend.len().div_ceil(per_row) as u32
    }

    /// The panels' width, or the title's where that is wider.
    fn width(&self) -> u32 {
        (self.grid().1 as u32 * PANEL_W).max(text_width(&self.title, TITLE_FONT) + 40)
    }

    /// Size of the SVG in pixels (the PNG is twice as wide and high).
    pub fn size(&self) -> (u32, u32) {
        (self.width(), TITLE_H + self.grid().0 as u32 * PANEL_H + self.legend_h())
    }

    /// The figure as an SVG document.
    pub fn svg(&self) -> Result<String> {
        register_font()?;
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, self.size()).into_drawing_area();
            self.draw(&root, 1.0).and_then(|()| root.present().map_err(|e| e.to_string())).map_err(|e| Error::Invalid(format!("plot {:?}: {e}", self.title)))?;
        }
        Ok(out)
    }

    /// Draw the figure at twice the SVG's pixel size and write it to `path` as a PNG.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        register_font()?;
        let (w, h) = self.size();
        let root = BitMapBackend::new(path, (2 * w, 2 * h)).into_drawing_area();
        self.draw(&root, 2.0).and_then(|()| root.present().map_err(|e| e.to_string())).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, s: f64) -> std::result::Result<(), String> {
        root.fill(&WHITE).map_err(err)?;
        let (w, _) = root.dim_in_pixel();
        let (head, body) = root.split_vertically(px(s, TITLE_H as f64));
        let centre = Pos::new(HPos::Center, VPos::Center);
        head.draw(&Text::new(self.title.clone(), ((w / 2) as i32, px(s, TITLE_H as f64 * 0.55) as i32), font(s, TITLE_FONT).pos(centre))).map_err(err)?;
        let (rows, cols) = self.grid();
        let (grid, legend) = body.split_vertically(px(s, (rows as u32 * PANEL_H) as f64));
        for (panel, cell) in self.panels.iter().zip(grid.split_evenly((rows, cols))) {
            draw_panel(&cell, panel, s)?;
        }
        self.draw_legend(&legend, s)
    }

    /// The legend: entries in rows under the panels, the block centred.
    fn draw_legend<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, s: f64) -> std::result::Result<(), String> {
        let at = |v: f64| (v * s).round() as i32;
        let (entry, per_row) = self.legend_layout();
        let (w, _) = area.dim_in_pixel();
        let x_start = (w as i32 - at((entry as usize * per_row) as f64)) / 2;
        let left = Pos::new(HPos::Left, VPos::Center);
        for (i, m) in self.legend.iter().enumerate() {
            let (col, row) = (i % per_row, i / per_row);
            let (xa, y) = (x_start + at((col as u32 * entry) as f64), at(LEGEND_PAD as f64 / 2.0 + LEGEND_ROW as f64 * (row as f64 + 0.5)));
            let xb = xa + at(34.0);
            let c = rgb(m);
            if m == "full" && !self.full_star {
                area.draw(&DashedPathElement::new(vec![(xa, y), (xb, y)], at(6.0), at(4.0), BLACK.stroke_width(lw(s, 1.6)))).map_err(err)?;
            } else if m != "full" {
                area.draw(&PathElement::new(vec![(xa, y), (xb, y)], c.stroke_width(lw(s, 2.0)))).map_err(err)?;
            }
            if m != "full" || self.full_star {
                let (centre, r) = (((xa + xb) / 2, y), if m == "full" { 4.0 } else { 3.6 });
                area.draw(&(EmptyElement::at(centre) + Polygon::new(marker_outline(marker(m), (r + 1.2) * s), WHITE.filled()))).map_err(err)?;
                area.draw(&(EmptyElement::at(centre) + Polygon::new(marker_outline(marker(m), r * s), c.filled()))).map_err(err)?;
            }
            area.draw(&Text::new(legend_name(m), (xb + at(8.0), y), font(s, LEGEND_FONT).pos(left))).map_err(err)?;
        }
        Ok(())
    }
}

/// Width in SVG pixels of `text` at `size`, measured with the embedded font (7 px a character
/// if it did not load).
fn text_width(text: &str, size: f64) -> u32 {
    match register_font().map(|()| font(1.0, size).font.box_size(text)) {
        Ok(Ok((w, _))) => w,
        _ => 7 * text.chars().count() as u32,
    }
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A length of `v` SVG pixels at scale `s`, in backend pixels.
fn px(s: f64, v: f64) -> u32 {
    (v * s).round() as u32
}

/// A stroke width of `v` SVG pixels at scale `s` (at least one pixel).
fn lw(s: f64, v: f64) -> u32 {
    ((v * s).round() as u32).max(1)
}

fn font(s: f64, size: f64) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size * s).into_font()).color(&RGBColor(25, 25, 25))
}

/// The x axis of every panel: log scale, ticks given.
type XAxis = WithKeyPoints<LogCoord<f64>>;

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel, s: f64) -> std::result::Result<(), String> {
    let ok_y = |v: f64| v.is_finite() && (!p.log_y || v > 0.0);
    let mut xs: Vec<f64> = p.series.iter().flat_map(|se| se.pts.iter().map(|q| q.x)).collect();
    if let Some(Reference::Star(q)) = &p.reference {
        xs.push(q.x);
    }
    if let Some(t) = &p.x_ticks {
        xs.extend(t.iter().map(|t| t.0));
    }
    xs.retain(|x| x.is_finite() && *x > 0.0);
    let mut ys: Vec<f64> = Vec::new();
    let pts = p.series.iter().flat_map(|se| se.pts.iter()).chain(p.reference.iter().map(|r| match r {
        Reference::Line(q) | Reference::Star(q) => q,
    }));
    for q in pts {
        if ok_y(q.y) {
            ys.push(q.y);
            if let Some((lo, hi)) = q.bar(p.log_y) {
                ys.extend([lo, hi]);
            }
        }
    }
    ys.retain(|v| ok_y(*v));
    if xs.is_empty() || ys.is_empty() {
        let (w, h) = area.dim_in_pixel();
        let centre = Pos::new(HPos::Center, VPos::Center);
        area.draw(&Text::new(format!("{}: no data to draw", p.title), (w as i32 / 2, h as i32 / 2), font(s, 12.5).pos(centre))).map_err(err)?;
        return Ok(());
    }
    // x range: the points, padded by more than the dodge ([`dodge_step`]) on either side.
    let (xmin, xmax) = (xs.iter().copied().fold(f64::INFINITY, f64::min), xs.iter().copied().fold(0.0, f64::max));
    let span = (xmax / xmin).ln();
    let n = p.series.len().max(1) as f64;
    let gap = match &p.x_ticks {
        Some(t) if t.len() > 1 => t.windows(2).map(|w| (w[1].0 / w[0].0).ln().abs()).fold(f64::INFINITY, f64::min),
        _ => span / 5.0,
    };
    let step = dodge_step(span, gap, p.series.len());
    let pad = if span > 0.0 { 0.07 * span } else { 0.4 } + step * (n - 1.0) / 2.0;
    let (x0, x1) = (xmin * (-pad).exp(), xmax * pad.exp());
    let (mut x_ticks, x_light) = match &p.x_ticks {
        Some(t) => (t.clone(), Vec::new()),
        None => {
            let (bold, light) = log_ticks(x0, x1);
            (bold.into_iter().map(|v| (v, fmt_tick(v))).collect(), light)
        }
    };
    thin_labels(&mut x_ticks, x0, x1);
    let x_spec = (x0..x1).log_scale().with_key_points(x_ticks.iter().map(|t| t.0).collect()).with_light_points(x_light);
    let (ymin, ymax) = (ys.iter().copied().fold(f64::INFINITY, f64::min), ys.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    if p.log_y {
        let lspan = (ymax / ymin).log10().max(0.3);
        let k = 10f64.powf(0.06 * lspan);
        let (y0, y1) = (ymin / k, ymax * k);
        let (bold, light) = log_ticks(y0, y1);
        draw_chart(area, p, s, x_spec, &x_ticks, (y0..y1).log_scale().with_key_points(bold).with_light_points(light), step)
    } else {
        let (y0, y1) = if p.unit_y {
            (-0.04, 1.04)
        } else {
            let span = if ymax > ymin { ymax - ymin } else { ymax.abs().max(1.0) };
            (ymin - 0.07 * span, ymax + 0.07 * span)
        };
        draw_chart(area, p, s, x_spec, &x_ticks, y0..y1, step)
    }
}

/// Blank the label of each x tick that would overlap the label kept before it (its tick and
/// grid line stay), measured with the embedded font on the panel's plotting width.
fn thin_labels(ticks: &mut [(f64, String)], x0: f64, x1: f64) {
    let width = (PANEL_W - Y_LABELS_W - MARGIN_L - MARGIN_R) as f64;
    let mut end = f64::NEG_INFINITY;
    for (x, label) in ticks.iter_mut() {
        let at = width * (x.ln() - x0.ln()) / (x1.ln() - x0.ln());
        let w = text_width(label, TICK_FONT) as f64;
        if at - w / 2.0 < end + 6.0 {
            label.clear();
        } else {
            end = at + w / 2.0;
        }
    }
}

/// The log-x distance between neighbouring methods' markers at one budget point: about four
/// pixels, but all the methods together take at most a third of the smallest gap between
/// budget points (`gap`, in log units).
fn dodge_step(span: f64, gap: f64, n: usize) -> f64 {
    let span = if span > 0.0 { span } else { 1.0 };
    let gap = if gap > 0.0 && gap.is_finite() { gap } else { span };
    (0.016 * span).min(gap / 3.0 / (n.max(2) - 1) as f64)
}

#[allow(clippy::too_many_arguments)]
fn draw_chart<DB: DrawingBackend, Y>(area: &DrawingArea<DB, Shift>, p: &Panel, s: f64, x_spec: XAxis, x_ticks: &[(f64, String)], y_spec: Y, step: f64) -> std::result::Result<(), String>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, font(s, 14.0))
        .margin_top(px(s, 4.0))
        .margin_left(px(s, MARGIN_L as f64))
        .margin_right(px(s, MARGIN_R as f64))
        .margin_bottom(px(s, 6.0))
        .x_label_area_size(px(s, 44.0))
        .y_label_area_size(px(s, Y_LABELS_W as f64))
        .build_cartesian_2d(x_spec, y_spec)
        .map_err(err)?;
    let x_label = |v: &f64| x_ticks.iter().find(|t| (t.0 / v - 1.0).abs() < 1e-9).map_or_else(|| fmt_tick(*v), |t| t.1.clone());
    let y_label = |v: &f64| fmt_tick(*v);
    chart
        .configure_mesh()
        .x_desc(p.x_desc.clone())
        .y_desc(p.y_desc.clone())
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style(font(s, TICK_FONT))
        .axis_desc_style(font(s, 12.5))
        .bold_line_style(RGBColor(222, 222, 222).stroke_width(lw(s, 1.0)))
        .light_line_style(RGBColor(244, 244, 244).stroke_width(lw(s, 1.0)))
        .axis_style(RGBColor(90, 90, 90).stroke_width(lw(s, 1.0)))
        .set_all_tick_mark_size(px(s, 4.0))
        .y_labels(7)
        .y_max_light_lines(1)
        .draw()
        .map_err(err)?;
    let (xr, yr) = (chart.x_range(), chart.y_range());
    // Close the frame on the top and right.
    let frame = RGBColor(90, 90, 90).stroke_width(lw(s, 1.0));
    chart.draw_series(std::iter::once(PathElement::new(vec![(xr.start, yr.end), (xr.end, yr.end), (xr.end, yr.start)], frame))).map_err(err)?;
    let ok_y = |v: f64| v.is_finite() && (!p.log_y || v > 0.0);
    let bar_w = px(s, 7.0);
    let dot = |c: Pt, m: Marker, r: f64, colour: RGBColor| {
        [
            EmptyElement::at((c.x, c.y)) + Polygon::new(marker_outline(m, (r + 1.2) * s), WHITE.filled()),
            EmptyElement::at((c.x, c.y)) + Polygon::new(marker_outline(m, r * s), colour.filled()),
        ]
    };
    match &p.reference {
        Some(Reference::Line(q)) if ok_y(q.y) => {
            if let Some((lo, hi)) = q.bar(p.log_y) {
                chart.draw_series(std::iter::once(Rectangle::new([(xr.start, lo), (xr.end, hi)], BLACK.mix(0.09).filled()))).map_err(err)?;
            }
            chart.draw_series(DashedLineSeries::new(vec![(xr.start, q.y), (xr.end, q.y)], px(s, 6.0), px(s, 4.0), BLACK.stroke_width(lw(s, 1.6)))).map_err(err)?;
        }
        _ => {}
    }
    let n = p.series.len() as f64;
    for (i, se) in p.series.iter().enumerate() {
        let f = (step * (i as f64 - (n - 1.0) / 2.0)).exp();
        let c = rgb(&se.method);
        let mut pts: Vec<Pt> = se.pts.iter().filter(|q| ok_y(q.y) && q.x > 0.0).map(|q| Pt { x: q.x * f, ..*q }).collect();
        pts.sort_by(|a, b| a.x.total_cmp(&b.x));
        chart.draw_series(LineSeries::new(pts.iter().map(|q| (q.x, q.y)), c.stroke_width(lw(s, 2.0)))).map_err(err)?;
        chart.draw_series(pts.iter().filter_map(|q| q.bar(p.log_y).map(|(lo, hi)| ErrorBar::new_vertical(q.x, lo, q.y, hi, c.stroke_width(lw(s, 1.3)), bar_w)))).map_err(err)?;
        chart.draw_series(pts.iter().flat_map(|q| dot(*q, marker(&se.method), 3.6, c))).map_err(err)?;
    }
    if let Some(Reference::Star(q)) = &p.reference {
        if ok_y(q.y) {
            if let Some((lo, hi)) = q.bar(p.log_y) {
                chart.draw_series(std::iter::once(ErrorBar::new_vertical(q.x, lo, q.y, hi, BLACK.stroke_width(lw(s, 1.3)), bar_w))).map_err(err)?;
            }
            chart.draw_series(dot(*q, Marker::Star, 4.0, BLACK)).map_err(err)?;
        }
    }
    Ok(())
}

/// Ticks of a log axis over [lo, hi]: (labelled, unlabelled grid lines). Powers of ten when the
/// range holds two or more, else 1-2-5 multiples (two or more), else every multiple (three or
/// more), else linear ticks.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let inside = |v: f64| v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9);
    let (e0, e1) = (lo.log10().ceil() as i32, hi.log10().floor() as i32);
    let multiples = |ms: &[f64]| -> Vec<f64> { (e0 - 1..=e1).flat_map(|e| ms.iter().map(move |m| m * 10f64.powi(e))).filter(|v| inside(*v)).collect() };
    if e1 > e0 {
        let every = (e1 - e0) as usize / 6 + 1;
        let bold: Vec<f64> = (e0..=e1).filter(|e| ((e - e0) as usize).is_multiple_of(every)).map(|e| 10f64.powi(e)).collect();
        let light = if every == 1 { multiples(&[2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]) } else { (e0..=e1).map(|e| 10f64.powi(e)).filter(|v| !bold.contains(v)).collect() };
        return (bold, light);
    }
    for (ms, enough) in [(&[1.0, 2.0, 5.0][..], 2), (&[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0][..], 3)] {
        let t = multiples(ms);
        if t.len() >= enough {
            return (t, Vec::new());
        }
    }
    (nice_ticks(lo, hi), Vec::new())
}

fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= 6.0).unwrap_or(10.0 * mag);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + 1e-9 * step {
        out.push(if v.abs() < 1e-12 * step { 0.0 } else { v });
        v += step;
    }
    out
}

/// A tick label: plain decimals from 0.001 to 99999 (four significant digits at most), else
/// `m×10ⁿ` (`10ⁿ` when m is 1).
fn fmt_tick(v: f64) -> String {
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    let a = v.abs();
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { format!("{v}") };
    }
    if (1e-3..1e5).contains(&a) {
        let dec = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
        return trim(format!("{v:.dec$}"));
    }
    let mut e = a.log10().floor() as i32;
    let mut m = v / 10f64.powi(e);
    if (m.abs() - 10.0).abs() < 0.05 {
        m /= 10.0;
        e += 1;
    }
    let sup: String = e
        .to_string()
        .chars()
        .map(|c| match c {
            '-' => '⁻',
            d => ['⁰', '¹', '²', '³', '⁴', '⁵', '⁶', '⁷', '⁸', '⁹'][d.to_digit(10).unwrap_or(0) as usize],
        })
        .collect();
    match trim(format!("{m:.1}")).as_str() {
        "1" => format!("10{sup}"),
        "-1" => format!("−10{sup}"),
        ms => format!("{ms}×10{sup}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks() {
        assert_eq!(log_ticks(0.05, 20.0).0, vec![0.1, 1.0, 10.0]);
        assert_eq!(log_ticks(1.5, 9.0).0, vec![2.0, 5.0]);
        let (b, _) = log_ticks(2.1, 3.9);
        assert!(b.len() >= 3 && b.iter().all(|v| (2.1..=3.9).contains(v)), "{b:?}");
        let t = nice_ticks(0.0, 1.0);
        assert_eq!(t.first(), Some(&0.0));
        assert!((t.last().unwrap() - 1.0).abs() < 1e-12);
        assert_eq!((fmt_tick(0.25), fmt_tick(1234.0), fmt_tick(1e-4), fmt_tick(2e-5), fmt_tick(0.1 + 0.2)), ("0.25".into(), "1234".into(), "10⁻⁴".into(), "2×10⁻⁵".into(), "0.3".into()));
    }

    #[test]
    fn methods_keep_colour_and_marker() {
        assert_eq!(color("am-omp"), [214, 39, 40]);
        assert_eq!(rgb("full"), BLACK);
        assert_eq!(marker("full"), Marker::Star);
        assert_ne!(marker("am-omp"), marker("am-highest"));
        assert_eq!(color("kvzip"), color("kvzip"));
    }
}
