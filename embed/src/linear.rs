//! A dense layer, `y = x·Wᵀ + b`, for the few rows (word pieces) of one question. Weight rows
//! are taken two at a time and each pair is multiplied into every input row while it is in the
//! first-level cache: the weights, the bulk of the bytes, are read from memory once per call and
//! nothing is packed or copied. SIMD width is chosen at run time (pulp: AVX2 and FMA where the
//! CPU has them, narrower vectors or scalar code elsewhere), so the binary stays portable.

use std::ops::Range;

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

/// Input rows multiplied together by each pair of weight rows: eight accumulators (four rows ×
/// two weights) and the six loads that feed them fit in sixteen vector registers.
const TILE: usize = 4;

/// Parts a large product is cut into per rayon thread: more than one, so that a thread that
/// wakes late to its share leaves it to one that is already running.
const PARTS_PER_THREAD: usize = 2;

/// Multiply-adds per part below which a product is not split: about 0.1 ms of one core, far
/// above what a fork and join cost (a few microseconds).
const SPLIT_MACS: usize = 1 << 20;

/// A `outputs × inputs` weight matrix (row-major, as PyTorch's `nn.Linear` stores it) and its
/// bias.
pub struct Linear {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
}

impl Linear {
    /// `None` when the lengths do not make a `bias.len() × inputs` matrix.
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, inputs: usize) -> Option<Linear> {
        (inputs > 0 && weight.len() == bias.len() * inputs).then_some(Linear {
            weight,
            bias,
            inputs,
        })
    }

    pub fn outputs(&self) -> usize {
        self.bias.len()
    }

    /// `x` holds `x.len() / inputs` rows; returns as many rows of `outputs` values.
    ///
    /// A large product is split by weight rows into `PARTS_PER_THREAD` parts per rayon thread
    /// (the embedder's pool when called from it): each part reads its share of the weights,
    /// which is what bounds a short question. A busy pool runs the parts one after the other,
    /// at no extra cost.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        self.forward_then(x, |v| v)
    }

    /// [`Linear::forward`] with `activation` applied to every output, inside the parts, so
    /// it is split over the threads too.
    pub fn forward_then(&self, x: &[f32], activation: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
        debug_assert_eq!(x.len() % self.inputs, 0);
        let rows = x.len() / self.inputs;
        let n = self.outputs();
        let parts = (PARTS_PER_THREAD * rayon::current_num_threads())
            .min(x.len() * n / SPLIT_MACS)
            .min(n / 2)
            .max(1);
        let product = |range: Range<usize>| {
            let mut part = self.product(x, range);
            part.iter_mut().for_each(|v| *v = activation(*v));
            part
        };
        if parts == 1 {
            return product(0..n);
        }
        // Even boundaries keep weight rows paired as the kernel takes them.
        let step = n.div_ceil(parts).next_multiple_of(2);
        let ranges: Vec<Range<usize>> = (0..n)
            .step_by(step)
            .map(|start| start..(start + step).min(n))
            .collect();
        let products: Vec<Vec<f32>> = ranges
            .par_iter()
            .map(|range| product(range.clone()))
            .collect();
        let mut out = Vec::with_capacity(rows * n);
        for r in 0..rows {
            for (range, part) in ranges.iter().zip(&products) {
                let width = range.len();
                out.extend_from_slice(&part[r * width..(r + 1) * width]);
            }
        }
        out
    }

    fn product(&self, x: &[f32], range: Range<usize>) -> Vec<f32> {
        let k = self.inputs;
        let mut out = vec![0f32; x.len() / k * range.len()];
        Arch::new().dispatch(Product {
            weight: &self.weight[range.start * k..range.end * k],
            bias: &self.bias[range],
            inputs: k,
            x,
            out: &mut out,
        });
        out
    }
}

/// `x` times the weight rows `weight` (each `inputs` long), plus `bias`, into `out`.
struct Product<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    inputs: usize,
    x: &'a [f32],
    out: &'a mut [f32],
}

impl WithSimd for Product<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Product {
            weight,
            bias,
            inputs: k,
            x,
            out,
        } = self;
        let n = bias.len();
        let rows: Vec<&[f32]> = x.chunks_exact(k).collect();
        let weights: Vec<&[f32]> = weight.chunks_exact(k).collect();
        for (pair_index, pair) in weights.chunks(2).enumerate() {
            let first = pair_index * 2;
            // An odd last row is paired with itself; its second result is not stored.
            let (w0, w1) = (pair[0], pair[pair.len() - 1]);
            for (tile_index, tile) in rows.chunks(TILE).enumerate() {
                let sums = match tile.len() {
                    4 => dots::<S, 4>(simd, w0, w1, tile),
                    3 => dots::<S, 3>(simd, w0, w1, tile),
                    2 => dots::<S, 2>(simd, w0, w1, tile),
                    _ => dots::<S, 1>(simd, w0, w1, tile),
                };
                for (t, row_sums) in sums.iter().enumerate().take(tile.len()) {
                    let at = (tile_index * TILE + t) * n + first;
                    for (o, (sum, bias)) in row_sums.iter().zip(&bias[first..]).enumerate() {
                        if o < pair.len() {
                            out[at + o] = sum + bias;
                        }
                    }
                }
            }
        }
    }
}

/// The dot products of `R` input rows with two weight rows, all of one length.
#[inline(always)]
fn dots<S: Simd, const R: usize>(
    simd: S,
    w0: &[f32],
    w1: &[f32],
    tile: &[&[f32]],
) -> [[f32; 2]; TILE] {
    let (head0, tail0) = S::as_simd_f32s(w0);
    let (head1, tail1) = S::as_simd_f32s(w1);
    let len = head0.len();
    // Every slice cut to one length, so the loop below indexes without bounds checks.
    let head1 = &head1[..len];
    let heads: [&[S::f32s]; R] = core::array::from_fn(|t| &S::as_simd_f32s(tile[t]).0[..len]);
    let mut acc = [[simd.splat_f32s(0.0); 2]; R];
    for c in 0..len {
        let (a, b) = (head0[c], head1[c]);
        for (sums, head) in acc.iter_mut().zip(&heads) {
            let x = head[c];
            sums[0] = simd.mul_add_e_f32s(x, a, sums[0]);
            sums[1] = simd.mul_add_e_f32s(x, b, sums[1]);
        }
    }
    let mut out = [[0f32; 2]; TILE];
    for ((o, sums), row) in out.iter_mut().zip(&acc).zip(tile) {
        let rest = &row[w0.len() - tail0.len()..];
        let tail = |w: &[f32]| -> f32 { w.iter().zip(rest).map(|(w, v)| w * v).sum() };
        o[0] = simd.reduce_sum_f32s(sums[0]) + tail(tail0);
        o[1] = simd.reduce_sum_f32s(sums[1]) + tail(tail1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(layer: &Linear, x: &[f32]) -> Vec<f32> {
        let k = layer.inputs;
        x.chunks_exact(k)
            .flat_map(|row| {
                layer
                    .weight
                    .chunks_exact(k)
                    .zip(&layer.bias)
                    .map(|(w, b)| {
                        let dot: f64 = w.iter().zip(row).map(|(a, v)| f64::from(a * v)).sum();
                        dot as f32 + b
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn every_row_count_and_width_matches_the_plain_product() {
        let mut seed = 7_u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        // Widths that are and are not a multiple of every SIMD width; 1..=9 rows covers a full
        // tile, a short one, and both.
        for (inputs, outputs) in [(384, 5), (13, 3), (1, 2), (40, 7), (16, 1)] {
            let weight = (0..inputs * outputs).map(|_| next()).collect();
            let bias = (0..outputs).map(|_| next()).collect();
            let layer = Linear::new(weight, bias, inputs).unwrap();
            for rows in 1..=9 {
                let x: Vec<f32> = (0..rows * inputs).map(|_| next()).collect();
                let got = layer.forward(&x);
                let want = naive(&layer, &x);
                assert_eq!(got.len(), rows * outputs);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-4,
                        "{inputs}×{outputs}, {rows} rows: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_product_split_over_threads_is_the_same_product() {
        // 9 rows × 1531 × 384: well above SPLIT_MACS, so split by weight rows over a pool of
        // three threads, the last part shorter; the rows of the parts must be put back in
        // order.
        let (inputs, outputs, rows) = (384, 1531, 9);
        assert!(rows * inputs * outputs > 4 * SPLIT_MACS);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let weight = (0..inputs * outputs).map(|i| ((i * 7919) % 211) as f32 / 211.0 - 0.5);
        let bias = (0..outputs).map(|i| i as f32 / 1000.0).collect();
        let layer = Linear::new(weight.collect(), bias, inputs).unwrap();
        let x: Vec<f32> = (0..rows * inputs)
            .map(|i| ((i * 31) % 97) as f32 / 97.0)
            .collect();
        let got = pool.install(|| layer.forward(&x));
        let want = naive(&layer, &x);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-3, "output {i}: {g} vs {w}");
        }
    }

    #[test]
    fn an_activation_is_applied_to_every_output_of_every_part() {
        let layer = Linear::new(vec![1.0; 2048 * 64], vec![0.5; 2048], 64).unwrap();
        let x = vec![0.25; 16 * 64];
        let plain = layer.forward(&x);
        let clipped = layer.forward_then(&x, |v| v.min(3.0));
        assert!(plain.iter().all(|v| *v == 16.5));
        assert_eq!(clipped, vec![3.0; 16 * 2048]);
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        assert!(Linear::new(vec![0.0; 6], vec![0.0; 2], 4).is_none());
        assert!(Linear::new(vec![], vec![], 0).is_none());
        assert!(Linear::new(vec![0.0; 8], vec![0.0; 2], 4).is_some());
    }
}
