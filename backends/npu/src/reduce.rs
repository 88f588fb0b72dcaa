//! Blocked vector reductions: the defined summation order of the emulated vector unit.
//!
//! A row is consumed in repeats of `lanes` elements (64 f32 = one 256-byte repeat): lane `l`
//! accumulates elements `l, l + lanes, l + 2*lanes, ...` sequentially in f32; the lanes are then
//! combined by a halving tree (`w` lanes -> `w - w/2`: lane `l < w/2` adds lane `l + w - w/2`).
//! Reductions over a non-contiguous dim use the contiguous inner elements as lanes and accumulate
//! along the reduced dim sequentially.

/// Sum `xs` with `lanes` f32 lane accumulators and a halving tree.
pub fn lane_sum(xs: &[f32], lanes: usize) -> f32 {
    let lanes = lanes.max(1);
    let mut acc = vec![0f32; lanes.min(xs.len().max(1))];
    let w0 = acc.len();
    for chunk in xs.chunks(w0) {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += *x;
        }
    }
    let mut w = w0;
    while w > 1 {
        let h = w / 2;
        for l in 0..h {
            acc[l] += acc[l + w - h];
        }
        w -= h;
    }
    acc[0]
}
