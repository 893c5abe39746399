//! Rotary position embeddings over q|k|v rows in place (see `engine::rotary`): the q and k
//! thirds of each token's row are rotated, v is left as it is.

use rayon::prelude::*;

/// Rotates q and k of every token of `qkv` (tokens, 3·hidden) by its angles: `cos`, `sin` are
/// (tokens, head_dim/2). `sign` −1 rotates back (the backward pass).
pub fn rotate(qkv: &mut [f32], hidden: usize, heads: usize, cos: &[f32], sin: &[f32], sign: f32) {
    let half = hidden / heads / 2;
    qkv.par_chunks_mut(3 * hidden)
        .zip(cos.par_chunks(half).zip(sin.par_chunks(half)))
        .for_each(|(row, (c, s))| {
            for head in row[..2 * hidden].chunks_mut(2 * half) {
                let (x1, x2) = head.split_at_mut(half);
                for d in 0..half {
                    let (a, b, sn) = (x1[d], x2[d], sign * s[d]);
                    x1[d] = a * c[d] - b * sn;
                    x2[d] = b * c[d] + a * sn;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotating_back_restores_the_rows_and_v_is_untouched() {
        let (hidden, heads, tokens) = (8, 2, 3);
        let orig: Vec<f32> = (0..tokens * 3 * hidden)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let cos: Vec<f32> = (0..tokens * 2).map(|i| (i as f32 * 0.5).cos()).collect();
        let sin: Vec<f32> = (0..tokens * 2).map(|i| (i as f32 * 0.5).sin()).collect();
        let mut x = orig.clone();
        rotate(&mut x, hidden, heads, &cos, &sin, 1.0);
        assert!(x.iter().zip(&orig).any(|(a, b)| (a - b).abs() > 0.1));
        for t in 0..tokens {
            let v = t * 3 * hidden + 2 * hidden;
            assert_eq!(x[v..v + hidden], orig[v..v + hidden]);
        }
        rotate(&mut x, hidden, heads, &cos, &sin, -1.0);
        assert!(x.iter().zip(&orig).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
