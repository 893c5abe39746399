//! A table's step gradient as the rows the step touched, each summed over its tokens: what the
//! word table's gradient is on the CPU (`passes.rs`), instead of a dense (vocab, hidden) table
//! of which a batch touches a few hundred rows.
//!
//! Every sum is the one the dense table would hold, bit for bit: a row starts at zero and its
//! tokens are added in token order, micro-batch after micro-batch; the sum of squares is taken
//! in the dense table's order (`sum_squares_in_dense_order`). The rows are kept in first-touch
//! order, which changes no sum (each row is its own).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct SummedRows {
    /// The table's shape: rows (the vocabulary) and width (hidden).
    table_rows: usize,
    width: usize,
    /// Table row → position in `ids` (and row of `values`).
    position: HashMap<u32, usize>,
    ids: Vec<u32>,
    /// (ids.len(), width), row after row.
    values: Vec<f32>,
}

impl SummedRows {
    /// No rows yet, of a (table_rows, width) table.
    pub fn new(table_rows: usize, width: usize) -> Self {
        Self {
            table_rows,
            width,
            position: HashMap::new(),
            ids: Vec::new(),
            values: Vec::new(),
        }
    }

    /// The dense table's shape.
    pub fn table_dims(&self) -> (usize, usize) {
        (self.table_rows, self.width)
    }

    /// The rows held, in first-touch order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Every row's values, in the order of [`Self::ids`].
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Row `id`'s sum, if the step touched it.
    pub fn row(&self, id: u32) -> Option<&[f32]> {
        let p = *self.position.get(&id)?;
        Some(&self.values[p * self.width..(p + 1) * self.width])
    }

    /// Row `id`, created at zero on its first touch (as the dense table holds it).
    fn row_mut(&mut self, id: u32) -> &mut [f32] {
        let width = self.width;
        let p = *self.position.entry(id).or_insert_with(|| {
            self.ids.push(id);
            self.values.resize(self.values.len() + width, 0.0);
            self.ids.len() - 1
        });
        &mut self.values[p * width..(p + 1) * width]
    }

    /// Adds `grads` (tokens, width), row `t` into table row `ids[t]`, in token order.
    pub fn add_tokens(&mut self, ids: &[u32], grads: &[f32]) -> Result<()> {
        let width = self.width;
        if grads.len() != ids.len() * width {
            return Err(Error::Internal(format!(
                "{} token gradients of width {width} hold {} values",
                ids.len(),
                grads.len()
            )));
        }
        for (t, &id) in ids.iter().enumerate() {
            if id as usize >= self.table_rows {
                return Err(Error::Internal(format!(
                    "token id {id} is outside the word table of {} rows",
                    self.table_rows
                )));
            }
            let from = &grads[t * width..(t + 1) * width];
            self.row_mut(id)
                .iter_mut()
                .zip(from)
                .for_each(|(d, g)| *d += g);
        }
        Ok(())
    }

    /// Adds `later`'s rows into these, as the dense `self + later` would.
    pub fn merge(&mut self, later: &SummedRows) -> Result<()> {
        if later.table_dims() != self.table_dims() {
            return Err(Error::Internal("summed rows of different tables".into()));
        }
        self.add_tokens(&later.ids, &later.values)
    }

    /// Σ g² of the dense table, summed in the order `optim::grad_norm` takes on it (chunks of
    /// `chunk` values, each through `sum_chunk`, in order): the untouched rows' zeros add
    /// exactly nothing, so the result is the dense table's bit for bit. `chunk` and the
    /// table's width must be multiples of 8, the lanes `sum_chunk` sums over.
    pub fn sum_squares_in_dense_order(&self, chunk: usize, sum_chunk: fn(&[f32]) -> f64) -> f64 {
        let width = self.width;
        let mut order: Vec<usize> = (0..self.ids.len()).collect();
        order.sort_unstable_by_key(|&p| self.ids[p]);
        // A chunk's touched values, gathered in table order with the zeros between them
        // folded away: lane k of `sum_chunk` sums the values at offsets ≡ k (mod 8) in order,
        // so each value is padded to its offset's lane, and the chunk to whole lanes (no
        // tail: the dense chunks have none, as their lengths are multiples of 8).
        let lane_pad = |packed: &mut Vec<f32>, offset: usize| {
            let pad = (offset % 8 + 8 - packed.len() % 8) % 8;
            packed.extend(std::iter::repeat_n(0.0, pad));
        };
        let mut total = 0f64;
        let mut current: Option<usize> = None;
        let mut packed: Vec<f32> = Vec::new();
        for p in order {
            let start = self.ids[p] as usize * width;
            for (k, &g) in self.values[p * width..(p + 1) * width].iter().enumerate() {
                let (c, offset) = ((start + k) / chunk, (start + k) % chunk);
                if current != Some(c) {
                    if current.is_some() {
                        lane_pad(&mut packed, 0);
                        total += sum_chunk(&packed);
                    }
                    packed.clear();
                    current = Some(c);
                }
                lane_pad(&mut packed, offset);
                packed.push(g);
            }
        }
        if current.is_some() {
            lane_pad(&mut packed, 0);
            total += sum_chunk(&packed);
        }
        total
    }

    /// The dense (table_rows, width) gradient on `device`: zeros with these rows added.
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        let mut dense = vec![0f32; self.table_rows * self.width];
        for (p, &id) in self.ids.iter().enumerate() {
            let row = id as usize * self.width;
            dense[row..row + self.width]
                .iter_mut()
                .zip(&self.values[p * self.width..(p + 1) * self.width])
                .for_each(|(d, g)| *d += g);
        }
        Ok(
            Tensor::from_vec(dense, (self.table_rows, self.width), &Device::Cpu)?
                .to_dtype(DType::F32)?
                .to_device(device)?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_their_tokens_and_densify_to_the_dense_sum() {
        let mut r = SummedRows::new(5, 2);
        r.add_tokens(&[3, 1, 3], &[1.0, 2.0, 10.0, 20.0, 0.5, 0.25])
            .unwrap();
        let mut later = SummedRows::new(5, 2);
        later.add_tokens(&[0, 1], &[7.0, 8.0, 1.0, 1.0]).unwrap();
        r.merge(&later).unwrap();
        assert_eq!(r.ids(), &[3, 1, 0]);
        assert_eq!(r.row(3), Some(&[1.5f32, 2.25][..]));
        assert_eq!(r.row(2), None);
        let dense = r.to_dense(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            dense,
            vec![
                vec![7.0, 8.0],
                vec![11.0, 21.0],
                vec![0.0, 0.0],
                vec![1.5, 2.25],
                vec![0.0, 0.0]
            ]
        );
        assert!(r.add_tokens(&[5], &[0.0, 0.0]).is_err());
    }
}
