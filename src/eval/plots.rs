//! Plots of each metric against the compression ratio, one line per method and one panel per
//! task, written as SVG and PNG with no plotting dependency.
//!
//! A figure is a list of [`Shape`]s in pixel coordinates; [`to_svg`] writes them as SVG text and
//! [`to_png`] rasterises them (Bresenham lines stamped to the stroke width, a 5×7 bitmap font) and
//! encodes an RGB PNG with flate2's zlib.

use std::io::Write;
use std::path::Path;

use super::metrics::{fmt_point, ResultRow};
use crate::error::{Error, Result};

type Rgb = [u8; 3];

/// One drawing primitive. Coordinates are pixels from the top-left corner (y grows down);
/// colours are 8-bit RGB.
#[derive(Debug, Clone)]
pub enum Shape {
    /// A straight segment.
    Line {
        /// Start x.
        x1: f64,
        /// Start y.
        y1: f64,
        /// End x.
        x2: f64,
        /// End y.
        y2: f64,
        /// Stroke colour.
        color: Rgb,
        /// Stroke width in pixels.
        width: f64,
    },
    /// An open polyline through `pts` in order.
    Poly {
        /// Vertices (x, y).
        pts: Vec<(f64, f64)>,
        /// Stroke colour.
        color: Rgb,
        /// Stroke width in pixels.
        width: f64,
        /// Dashed stroke (used for the `full` reference line).
        dashed: bool,
    },
    /// A filled disc.
    Dot {
        /// Centre x.
        x: f64,
        /// Centre y.
        y: f64,
        /// Radius in pixels.
        r: f64,
        /// Fill colour.
        color: Rgb,
    },
    /// An axis-aligned rectangle, stroked and/or filled.
    Rect {
        /// Left edge.
        x: f64,
        /// Top edge.
        y: f64,
        /// Width in pixels.
        w: f64,
        /// Height in pixels.
        h: f64,
        /// Outline colour; None = no outline.
        stroke: Option<Rgb>,
        /// Fill colour; None = transparent.
        fill: Option<Rgb>,
    },
    /// Text anchored at its baseline: anchor 0 = start, 1 = middle, 2 = end.
    Text {
        /// Anchor x.
        x: f64,
        /// Baseline y.
        y: f64,
        /// The text (the PNG font draws ASCII letters as lower case, unknown characters as '?').
        s: String,
        /// Font size in pixels (the PNG font doubles its 5×7 glyphs at 13 and above).
        size: f64,
        /// 0 = start, 1 = middle, 2 = end.
        anchor: u8,
        /// Text colour.
        color: Rgb,
    },
}

/// A figure: its size in pixels and the shapes drawn in order (later ones on top).
pub struct Figure {
    /// Width in pixels.
    pub w: usize,
    /// Height in pixels.
    pub h: usize,
    /// Shapes in drawing order.
    pub shapes: Vec<Shape>,
}

/// Line colour of a method (fixed, so every plot uses the same).
pub fn color(method: &str) -> Rgb {
    match method {
        "am-omp" => [214, 39, 40],
        "am-highest" => [255, 127, 14],
        "baseline" => [140, 86, 75],
        "qfilters" => [31, 119, 180],
        "streaming-llm" => [44, 160, 44],
        "h2o" => [148, 103, 189],
        "snapkv" => [227, 119, 194],
        "pyramidkv" => [127, 127, 127],
        "tova" => [188, 189, 34],
        "knorm" => [23, 190, 207],
        "expected-attention" => [120, 150, 230],
        "random" => [190, 170, 120],
        "full" => [0, 0, 0],
        _ => {
            let h = method.bytes().fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
            [(h & 0x7f) as u8 + 60, ((h >> 8) & 0x7f) as u8 + 60, ((h >> 16) & 0x7f) as u8 + 60]
        }
    }
}

/// Metrics drawn on a log y axis.
fn log_y(metric: &str) -> bool {
    matches!(metric, "kl" | "mass_err" | "kv_bytes" | "compress_s")
}

const PW: f64 = 300.0; // panel width
const PH: f64 = 230.0; // panel height
const ML: f64 = 62.0; // panel margins
const MR: f64 = 14.0;
const MT: f64 = 26.0;
const MB: f64 = 40.0;
const TITLE: f64 = 30.0;
const LEGEND: f64 = 170.0;

/// Where a budget point sits on the log x axis: the ratio R, the ratio 1/(1 − r) a kvpress
/// compression ratio r stands for, or the rows N.
fn x_of(form: &str, v: f64) -> f64 {
    if form == "compression_ratio" {
        1.0 / (1.0 - v)
    } else {
        v
    }
}

/// The figure of one metric: a panel per task, x = the budget point (log), a line per method.
pub fn metric_figure(rows: &[ResultRow], metric: &str, methods: &[String], tasks: &[String], form: &str) -> Figure {
    let tasks: Vec<&String> = tasks.iter().filter(|t| rows.iter().any(|r| r.task == **t && r.metric == metric)).collect();
    let np = tasks.len().max(1);
    let title = match metric {
        "accuracy" => "accuracy (higher is better)",
        "answer_logppl" => "answer_logppl: nats/token of the full-cache answers (lower is better)",
        "kl" => "kl: next-token kl(full || compressed), nats (lower is better)",
        "attn_rel_l2" => "attn_rel_l2: per-head attention output error (lower is better)",
        "mass_err" => "mass_err: per-head attention mass error (lower is better)",
        "kv_bytes" => "kv_bytes: bytes held by the cache",
        "compress_s" => "compress_s: seconds to compress one context",
        m => m,
    };
    // Wide enough for the title (12 px per character at the title size).
    let w = ((np as f64 * PW + LEGEND).max(20.0 + 12.0 * title.chars().count() as f64)) as usize;
    let h = (PH + TITLE) as usize;
    let mut sh = vec![Shape::Rect { x: 0.0, y: 0.0, w: w as f64, h: h as f64, stroke: None, fill: Some([255, 255, 255]) }];
    sh.push(Shape::Text { x: 10.0, y: 20.0, s: title.to_string(), size: 14.0, anchor: 0, color: [0, 0, 0] });
    for (pi, task) in tasks.iter().enumerate() {
        let x0 = pi as f64 * PW;
        let (ax, ay, aw, ah) = (x0 + ML, TITLE + MT, PW - ML - MR, PH - MT - MB);
        let pts: Vec<&ResultRow> = rows.iter().filter(|r| r.task == **task && r.metric == metric).collect();
        let logy = log_y(metric);
        let ok = |v: f64| v.is_finite() && (!logy || v > 0.0);
        let xs: Vec<f64> = pts.iter().map(|r| x_of(form, r.ratio)).filter(|r| *r > 0.0).collect();
        let ys: Vec<f64> = pts.iter().map(|r| r.value).filter(|v| ok(*v)).collect();
        sh.push(Shape::Text { x: x0 + ML + aw / 2.0, y: TITLE + 16.0, s: task.to_string(), size: 12.0, anchor: 1, color: [0, 0, 0] });
        sh.push(Shape::Rect { x: ax, y: ay, w: aw, h: ah, stroke: Some([80, 80, 80]), fill: None });
        if xs.is_empty() || ys.is_empty() {
            continue;
        }
        let (xmin, xmax) = (xs.iter().copied().fold(f64::INFINITY, f64::min), xs.iter().copied().fold(0.0, f64::max));
        let (lx0, lx1) = if xmax > xmin { (xmin.ln(), xmax.ln()) } else { (xmin.ln() - 0.5, xmin.ln() + 0.5) };
        let (mut y0, mut y1) = (ys.iter().copied().fold(f64::INFINITY, f64::min), ys.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        if logy {
            y0 = y0.log10().floor();
            y1 = y1.log10().ceil();
            if y1 <= y0 {
                y1 = y0 + 1.0;
            }
        } else {
            if metric == "accuracy" {
                y0 = 0.0;
                y1 = y1.max(1.0);
            }
            if y0 > 0.0 && metric != "accuracy" && y0 < 0.5 * y1 {
                y0 = 0.0;
            }
            if y1 <= y0 {
                y1 = y0 + 1.0;
            }
            let pad = 0.05 * (y1 - y0);
            if metric != "accuracy" {
                y1 += pad;
                if y0 != 0.0 {
                    y0 -= pad;
                }
            }
        }
        let px = |r: f64| ax + 8.0 + (aw - 16.0) * (r.ln() - lx0) / (lx1 - lx0);
        let py = |v: f64| {
            let t = if logy { v.log10() } else { v };
            ay + ah - ah * (t - y0) / (y1 - y0)
        };
        // x ticks at the ratios.
        let mut ticks: Vec<f64> = pts.iter().map(|r| r.ratio).filter(|r| x_of(form, *r) > 0.0).collect();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        for r in &ticks {
            let x = px(x_of(form, *r));
            sh.push(Shape::Line { x1: x, y1: ay + ah, x2: x, y2: ay + ah + 4.0, color: [80, 80, 80], width: 1.0 });
            let label = fmt_point(form, *r).replace('×', "x").replace(" rows", "");
            sh.push(Shape::Text { x, y: ay + ah + 16.0, s: label, size: 10.0, anchor: 1, color: [40, 40, 40] });
        }
        let axis = match form {
            "compression_ratio" => "kvpress compression ratio",
            "budget" => "rows kept per KV head",
            _ => "compression ratio",
        };
        sh.push(Shape::Text { x: ax + aw / 2.0, y: ay + ah + 32.0, s: axis.into(), size: 10.0, anchor: 1, color: [40, 40, 40] });
        // y ticks.
        let yt: Vec<(f64, String)> = if logy {
            (y0 as i64..=y1 as i64).map(|e| (10f64.powi(e as i32), format!("1e{e}"))).collect()
        } else {
            nice_ticks(y0, y1).into_iter().map(|v| (v, fmt_tick(v))).collect()
        };
        for (v, label) in yt {
            let y = py(v);
            if !(ay - 0.5..=ay + ah + 0.5).contains(&y) {
                continue;
            }
            sh.push(Shape::Line { x1: ax, y1: y, x2: ax + aw, y2: y, color: [225, 225, 225], width: 1.0 });
            sh.push(Shape::Text { x: ax - 5.0, y: y + 4.0, s: label, size: 10.0, anchor: 2, color: [40, 40, 40] });
        }
        for m in methods {
            let mut line: Vec<(f64, f64)> = pts.iter().filter(|r| r.method == *m && ok(r.value) && x_of(form, r.ratio) > 0.0).map(|r| (px(x_of(form, r.ratio)), py(r.value))).collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            if line.is_empty() {
                continue;
            }
            let c = color(m);
            sh.push(Shape::Poly { pts: line.clone(), color: c, width: 2.0, dashed: m == "full" });
            for (x, y) in line {
                sh.push(Shape::Dot { x, y, r: 3.0, color: c });
            }
        }
    }
    // Legend.
    let lx = np as f64 * PW + 10.0;
    for (i, m) in methods.iter().enumerate() {
        let y = TITLE + MT + 8.0 + i as f64 * 15.0;
        let c = color(m);
        sh.push(Shape::Line { x1: lx, y1: y - 4.0, x2: lx + 22.0, y2: y - 4.0, color: c, width: 2.0 });
        sh.push(Shape::Dot { x: lx + 11.0, y: y - 4.0, r: 3.0, color: c });
        sh.push(Shape::Text { x: lx + 28.0, y, s: m.clone(), size: 11.0, anchor: 0, color: [0, 0, 0] });
    }
    Figure { w, h, shapes: sh }
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

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.abs() < 0.01 {
        format!("{v:.0e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn hex(c: Rgb) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The figure as an SVG document.
pub fn to_svg(f: &Figure) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" font-family=\"Helvetica, Arial, sans-serif\">\n",
        f.w, f.h, f.w, f.h
    );
    for sh in &f.shapes {
        match sh {
            Shape::Line { x1, y1, x2, y2, color, width } => {
                s.push_str(&format!("<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{}\" stroke-width=\"{width}\"/>\n", hex(*color)))
            }
            Shape::Poly { pts, color, width, dashed } => {
                let p: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let dash = if *dashed { " stroke-dasharray=\"6,4\"" } else { "" };
                s.push_str(&format!("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{width}\"{dash}/>\n", p.join(" "), hex(*color)));
            }
            Shape::Dot { x, y, r, color } => s.push_str(&format!("<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"{r}\" fill=\"{}\"/>\n", hex(*color))),
            Shape::Rect { x, y, w, h, stroke, fill } => s.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{}\" stroke=\"{}\"/>\n",
                fill.map_or("none".into(), hex),
                stroke.map_or("none".into(), hex)
            )),
            Shape::Text { x, y, s: t, size, anchor, color } => {
                let a = ["start", "middle", "end"][(*anchor as usize).min(2)];
                s.push_str(&format!("<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" text-anchor=\"{a}\" fill=\"{}\">{}</text>\n", hex(*color), esc(t)));
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------------------------------------
// Raster

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>, // [h, w, 3]
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn stamp(&mut self, x: i64, y: i64, width: f64, c: Rgb) {
        let r = ((width - 1.0) / 2.0).max(0.0);
        let (lo, hi) = (-(r.floor() as i64), r.ceil() as i64);
        for dy in lo..=hi {
            for dx in lo..=hi {
                self.set(x + dx, y + dy, c);
            }
        }
    }

    // The segment's own coordinates plus the stroke style: a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, width: f64, c: Rgb, dash: bool) {
        let (mut x, mut y) = (x1.round() as i64, y1.round() as i64);
        let (xe, ye) = (x2.round() as i64, y2.round() as i64);
        let (dx, dy) = ((xe - x).abs(), -(ye - y).abs());
        let (sx, sy) = (if x < xe { 1 } else { -1 }, if y < ye { 1 } else { -1 });
        let mut err = dx + dy;
        let mut k = 0usize;
        loop {
            if !dash || (k / 6) % 5 < 3 {
                self.stamp(x, y, width, c);
            }
            k += 1;
            if x == xe && y == ye {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: f64, y: f64, s: &str, size: f64, anchor: u8, c: Rgb) {
        let scale = if size >= 13.0 { 2 } else { 1 };
        let adv = 6 * scale as i64;
        let n = s.chars().count() as i64;
        let width = n * adv;
        let mut cx = x.round() as i64 - match anchor {
            1 => width / 2,
            2 => width,
            _ => 0,
        };
        let top = y.round() as i64 - 7 * scale as i64;
        for ch in s.chars() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        for sy in 0..scale {
                            for sx in 0..scale {
                                self.set(cx + (col * scale + sx) as i64, top + (row * scale + sy) as i64, c);
                            }
                        }
                    }
                }
            }
            cx += adv;
        }
    }
}

/// A 5×7 glyph, one row per byte (bit 4 = leftmost column). Upper case draws as lower case.
fn glyph(c: char) -> [u8; 7] {
    let c = if c == '×' { 'x' } else { c.to_ascii_lowercase() };
    let rows: [&str; 7] = match c {
        '0' => [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
        '1' => ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
        '2' => [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
        '3' => ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
        '4' => ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
        '5' => ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
        '6' => ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
        '7' => ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
        '8' => [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
        '9' => [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
        'a' => [".....", ".....", ".###.", "....#", ".####", "#...#", ".####"],
        'b' => ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."],
        'c' => [".....", ".....", ".###.", "#....", "#....", "#...#", ".###."],
        'd' => ["....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"],
        'e' => [".....", ".....", ".###.", "#...#", "#####", "#....", ".###."],
        'f' => ["..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."],
        'g' => [".....", ".####", "#...#", "#...#", ".####", "....#", ".###."],
        'h' => ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"],
        'i' => ["..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."],
        'j' => ["...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##.."],
        'k' => ["#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."],
        'l' => [".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."],
        'm' => [".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"],
        'n' => [".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"],
        'o' => [".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."],
        'p' => [".....", "####.", "#...#", "#...#", "####.", "#....", "#...."],
        'q' => [".....", ".##.#", "#..##", "#...#", ".####", "....#", "....#"],
        'r' => [".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."],
        's' => [".....", ".....", ".###.", "#....", ".###.", "....#", "####."],
        't' => [".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."],
        'u' => [".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"],
        'v' => [".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."],
        'w' => [".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."],
        'x' => [".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"],
        'y' => [".....", "#...#", "#...#", "#...#", ".####", "....#", ".###."],
        'z' => [".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"],
        '.' => [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."],
        ',' => [".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."],
        '-' => [".....", ".....", ".....", ".###.", ".....", ".....", "....."],
        '_' => [".....", ".....", ".....", ".....", ".....", ".....", "#####"],
        '(' => ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."],
        ')' => [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."],
        '/' => ["....#", "....#", "...#.", "..#..", ".#...", "#....", "#...."],
        ':' => [".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."],
        '%' => ["##..#", "##.#.", "...#.", "..#..", ".#...", ".#.##", "#..##"],
        '+' => [".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."],
        '=' => [".....", ".....", "#####", ".....", "#####", ".....", "....."],
        '>' => [".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."],
        '<' => ["...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."],
        '|' => ["..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."],
        ' ' => [".....", ".....", ".....", ".....", ".....", ".....", "....."],
        _ => [".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."],
    };
    let mut g = [0u8; 7];
    for (i, r) in rows.iter().enumerate() {
        g[i] = r.bytes().fold(0u8, |a, b| (a << 1) | u8::from(b == b'#'));
    }
    g
}

/// The figure rasterised at 1 px per unit and encoded as an RGB PNG.
pub fn to_png(f: &Figure) -> Vec<u8> {
    let mut cv = Canvas { w: f.w, h: f.h, px: vec![255; f.w * f.h * 3] };
    for sh in &f.shapes {
        match sh {
            Shape::Line { x1, y1, x2, y2, color, width } => cv.line(*x1, *y1, *x2, *y2, *width, *color, false),
            Shape::Poly { pts, color, width, dashed } => {
                for p in pts.windows(2) {
                    cv.line(p[0].0, p[0].1, p[1].0, p[1].1, *width, *color, *dashed);
                }
            }
            Shape::Dot { x, y, r, color } => {
                let ri = r.ceil() as i64;
                for dy in -ri..=ri {
                    for dx in -ri..=ri {
                        if (dx * dx + dy * dy) as f64 <= r * r + 0.5 {
                            cv.set(x.round() as i64 + dx, y.round() as i64 + dy, *color);
                        }
                    }
                }
            }
            Shape::Rect { x, y, w, h, stroke, fill } => {
                if let Some(c) = fill {
                    for yy in y.round() as i64..(y + h).round() as i64 {
                        for xx in x.round() as i64..(x + w).round() as i64 {
                            cv.set(xx, yy, *c);
                        }
                    }
                }
                if let Some(c) = stroke {
                    let (x0, y0, x1, y1) = (*x, *y, x + w, y + h);
                    cv.line(x0, y0, x1, y0, 1.0, *c, false);
                    cv.line(x1, y0, x1, y1, 1.0, *c, false);
                    cv.line(x1, y1, x0, y1, 1.0, *c, false);
                    cv.line(x0, y1, x0, y0, 1.0, *c, false);
                }
            }
            Shape::Text { x, y, s, size, anchor, color } => cv.text(*x, *y, s, *size, *anchor, *color),
        }
    }
    encode_png(cv.w, cv.h, &cv.px)
}

/// Encode 8-bit RGB pixels [h, w, 3] as a PNG file.
pub fn encode_png(w: usize, h: usize, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(h * (w * 3 + 1));
    for row in rgb.chunks(w * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).expect("writing to a Vec cannot fail");
    let idat = z.finish().expect("writing to a Vec cannot fail");
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter, no interlace
    for (kind, data) in [(b"IHDR", &ihdr[..]), (b"IDAT", &idat[..]), (b"IEND", &[][..])] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    out
}

/// Write `plots/<metric>.svg` and `.png` for every metric that has rows.
pub fn write_plots(dir: &Path, rows: &[ResultRow], methods: &[String], tasks: &[String], form: &str) -> Result<Vec<String>> {
    let pdir = dir.join("plots");
    std::fs::create_dir_all(&pdir).map_err(|e| Error::io(&pdir, e))?;
    let mut written = Vec::new();
    for metric in super::metrics::METRICS {
        if !rows.iter().any(|r| r.metric == *metric) {
            continue;
        }
        let fig = metric_figure(rows, metric, methods, tasks, form);
        let svg = pdir.join(format!("{metric}.svg"));
        std::fs::write(&svg, to_svg(&fig)).map_err(|e| Error::io(&svg, e))?;
        let png = pdir.join(format!("{metric}.png"));
        std::fs::write(&png, to_png(&fig)).map_err(|e| Error::io(&png, e))?;
        written.push(metric.to_string());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_has_valid_structure() {
        let png = encode_png(2, 1, &[255, 0, 0, 0, 255, 0]);
        assert_eq!(&png[..8], &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        assert_eq!(&png[12..16], b"IHDR");
        // CRC of IEND is the well-known constant.
        assert_eq!(&png[png.len() - 4..], &[0xAE, 0x42, 0x60, 0x82]);
    }

    #[test]
    fn nice_ticks_cover_the_range() {
        let t = nice_ticks(0.0, 1.0);
        assert_eq!(t.first(), Some(&0.0));
        assert!((t.last().unwrap() - 1.0).abs() < 1e-12);
        assert!(nice_ticks(2.31, 2.97).len() >= 3);
    }
}
