//! Random-hyperplane LSH: `tables` tables of `bits` hyperplanes each; a vector's signature in a
//! table is the side of each plane it falls on. Vectors at a small angle share a signature in
//! at least one table with high probability, so the union of a query's buckets is a small
//! candidate set that `index.rs` re-ranks by exact cosine. The planes come from a fixed seed
//! through a generator written out here, so every replica (and every release) agrees.

/// The planes of every table.
#[derive(Debug, Clone)]
pub struct Lsh {
    tables: usize,
    bits: usize,
    dim: usize,
    /// `tables * bits` planes of `dim` values, row-major.
    planes: Vec<f32>,
}

impl Lsh {
    /// `bits` is at most 32 (a signature is a `u32`).
    pub fn new(tables: usize, bits: usize, dim: usize, seed: u64) -> Lsh {
        let bits = bits.clamp(1, 32);
        let mut rng = SplitMix64(seed);
        let planes = (0..tables * bits * dim).map(|_| rng.gaussian()).collect();
        Lsh {
            tables,
            bits,
            dim,
            planes,
        }
    }

    pub fn tables(&self) -> usize {
        self.tables
    }

    /// One signature per table.
    pub fn signatures(&self, v: &[f32]) -> Vec<u32> {
        let mut planes = self.planes.chunks_exact(self.dim);
        (0..self.tables)
            .map(|_| {
                let mut sig = 0u32;
                for bit in 0..self.bits {
                    let plane = planes.next().unwrap_or(&[]);
                    let side: f32 = plane.iter().zip(v).map(|(p, x)| p * x).sum();
                    if side >= 0.0 {
                        sig |= 1 << bit;
                    }
                }
                sig
            })
            .collect()
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, and its output for a seed never changes,
/// unlike a library generator whose stream may change between versions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller): the planes' directions are then uniform on the sphere.
    fn gaussian(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::semantic::pool::{dot, normalize};

    fn random_unit(rng: &mut SplitMix64, dim: usize) -> Vec<f32> {
        normalize((0..dim).map(|_| rng.gaussian()).collect())
    }

    /// `v` turned toward a random direction until its cosine with `v` is about `cos`.
    fn neighbour(rng: &mut SplitMix64, v: &[f32], cos: f32) -> Vec<f32> {
        let r = random_unit(rng, v.len());
        let along = dot(&r, v);
        let ortho = normalize(r.iter().zip(v).map(|(r, v)| r - along * v).collect());
        let sin = (1.0 - cos * cos).sqrt();
        v.iter()
            .zip(&ortho)
            .map(|(v, o)| cos * v + sin * o)
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_signatures_and_another_seed_does_not() {
        let mut rng = SplitMix64(7);
        let v = random_unit(&mut rng, 384);
        let a = Lsh::new(16, 8, 384, 42).signatures(&v);
        assert_eq!(a, Lsh::new(16, 8, 384, 42).signatures(&v));
        assert_ne!(a, Lsh::new(16, 8, 384, 43).signatures(&v));
        assert_eq!(a.len(), 16);
        assert!(a.iter().all(|s| *s < 256));
    }

    #[test]
    fn close_vectors_share_a_bucket_and_unrelated_ones_rarely_do() {
        let lsh = Lsh::new(16, 8, 384, 1);
        let mut rng = SplitMix64(99);
        let shares = |a: &[u32], b: &[u32]| a.iter().zip(b).any(|(x, y)| x == y);
        let (mut close, mut far) = (0, 0);
        for _ in 0..200 {
            let v = random_unit(&mut rng, 384);
            let near = neighbour(&mut rng, &v, 0.9);
            let other = random_unit(&mut rng, 384);
            let sv = lsh.signatures(&v);
            close += usize::from(shares(&sv, &lsh.signatures(&near)));
            far += usize::from(shares(&sv, &lsh.signatures(&other)));
        }
        // Theory: 1-(1-0.857^8)^16 = 0.996 at cosine 0.9; 1-(1-0.5^8)^16 = 0.06 at 0.
        assert!(close >= 194, "close pairs sharing a bucket: {close}/200");
        assert!(far <= 30, "unrelated pairs sharing a bucket: {far}/200");
    }
}
