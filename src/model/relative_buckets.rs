//! MPNet's relative positions: the bucket of the learned bias table each (query, key) pair of
//! a row reads. Pure functions with no imports, shared by the model (`mpnet.rs`, the bias) and
//! the layer op (`layer_op.rs`, its gradient summed by bucket).

/// The distance from which all pairs share a bucket, as in `modeling_mpnet.py`.
const MAX_DISTANCE: usize = 128;

/// Bucket of every (query, key) pair of a row of `seq` tokens, row-major (seq*seq), for a
/// table of `num_buckets`.
pub fn buckets_of_pairs(seq: usize, num_buckets: usize) -> Vec<u32> {
    relative_buckets(seq, num_buckets, MAX_DISTANCE)
}

/// Bucket of every (query, key) pair, row-major (seq*seq), as `relative_position_bucket` in
/// `modeling_mpnet.py`: half the buckets per direction, exact below `num_buckets/4`, then
/// logarithmic up to `max_distance`. The f32 arithmetic follows PyTorch's so buckets agree.
pub fn relative_buckets(seq: usize, num_buckets: usize, max_distance: usize) -> Vec<u32> {
    let half = (num_buckets / 2) as i64;
    let max_exact = half / 2;
    let log_ratio = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let mut out = Vec::with_capacity(seq * seq);
    for q in 0..seq as i64 {
        for k in 0..seq as i64 {
            let n = q - k; // -(memory - context)
            let mut bucket = if n < 0 { half } else { 0 };
            let n = n.abs();
            bucket += if n < max_exact {
                n
            } else {
                let scaled = ((n as f32 / max_exact as f32).ln() / log_ratio
                    * (half - max_exact) as f32) as i64;
                (max_exact + scaled).min(half - 1)
            };
            out.push(bucket as u32);
        }
    }
    out
}
