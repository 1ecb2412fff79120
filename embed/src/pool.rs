//! Sentence pooling as all-MiniLM-L6-v2's model card specifies: the mean of the token vectors
//! the attention mask keeps, then L2 normalisation. Pure arithmetic on plain slices, so it is
//! tested without the model; `embed.rs` feeds it the BERT output.

/// The mean over the tokens whose `mask` is non-zero of `hidden` (row-major, `mask.len()`
/// rows of `dim` values). A mask that keeps nothing gives the zero vector (the model card
/// clamps the divisor to 1e-9, which has the same effect).
pub fn mean_pool(hidden: &[f32], mask: &[u32], dim: usize) -> Vec<f32> {
    let mut sum = vec![0f32; dim];
    let mut kept = 0f32;
    for (row, &m) in hidden.chunks_exact(dim).zip(mask) {
        if m == 0 {
            continue;
        }
        kept += 1.0;
        for (s, v) in sum.iter_mut().zip(row) {
            *s += v;
        }
    }
    let divisor = kept.max(1e-9);
    sum.iter_mut().for_each(|s| *s /= divisor);
    sum
}

/// `v` scaled to unit length (`torch.nn.functional.normalize`, eps 1e-12), so that a dot
/// product of two outputs is their cosine.
pub fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// The dot product; the cosine of two normalised vectors.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_ignores_the_tokens_the_mask_drops() {
        let hidden = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        assert_eq!(mean_pool(&hidden, &[1, 1, 0], 2), vec![2.0, 3.0]);
    }

    #[test]
    fn a_mask_that_keeps_nothing_pools_to_zero() {
        assert_eq!(mean_pool(&[5.0, 5.0], &[0], 2), vec![0.0, 0.0]);
    }

    #[test]
    fn normalised_vectors_have_unit_length_and_keep_their_direction() {
        let v = normalize(vec![3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert!((dot(&v, &v) - 1.0).abs() < 1e-6);
        assert_eq!(normalize(vec![0.0, 0.0]), vec![0.0, 0.0]);
    }
}
