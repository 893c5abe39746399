//! AdamW's moments of a table whose gradient comes as rows (`summed_rows.rs`: the word table on
//! the CPU), kept for the rows ever touched only, and still exactly AdamW.
//!
//! A row never touched has m = v = 0 in the dense state, so its update is `w ← keep·w` (the
//! decoupled weight decay) and needs no state. A row, once touched, is given its moments (from
//! zero, as the dense state holds them until then) and is stepped every step from then on,
//! with its gradient or zero. Each element goes through the same arithmetic as the dense
//! update, so the weights are the dense update's bit for bit (`optim.rs` tests this). The
//! memory is the moments of the rows the training set contains, not of the vocabulary:
//! 1.4 GiB for XLM-R's 250002 × 768 table when dense (docs/memory.md).
//!
//! The moments live in blocks of [`BLOCK_ROWS`] rows, so touching new rows never moves
//! (reallocates) those already held.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::train::summed_rows::SummedRows;

/// Rows per block of moments: 768 KiB per moment at width 768.
const BLOCK_ROWS: usize = 256;
/// `slot` of a row never touched.
const NONE: u32 = u32::MAX;

/// One row's AdamW step: (w, m, v, g), each a row of the table's width.
pub type RowStep<'a> = dyn Fn(&mut [f32], &mut [f32], &mut [f32], &[f32]) + Sync + 'a;

#[derive(Debug, Clone)]
pub struct RowMoments {
    width: usize,
    /// Table row → its slot, [`NONE`] when never touched (grown to the table's rows as needed).
    slot: Vec<u32>,
    /// Slot → table row, in first-touch order.
    ids: Vec<u32>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl RowMoments {
    /// No row touched yet, of a table `width` values wide.
    pub fn new(width: usize) -> Self {
        Self {
            width,
            slot: Vec::new(),
            ids: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// The moments a checkpoint saved ([`Self::saved`]): row `ids[s]` has the `s`-th rows of
    /// `m` and `v`, (ids.len(), width) each. Why not, when they do not fit together.
    pub fn from_saved(
        ids: &[u32],
        m: &[f32],
        v: &[f32],
        width: usize,
    ) -> std::result::Result<Self, String> {
        if width == 0 || m.len() != ids.len() * width || v.len() != m.len() {
            return Err(format!(
                "{} row ids with {} and {} moment values do not make rows of {width}",
                ids.len(),
                m.len(),
                v.len()
            ));
        }
        let mut r = Self::new(width);
        for (s, &id) in ids.iter().enumerate() {
            if r.slot_of(id).is_some() {
                return Err(format!("row {id} is listed twice"));
            }
            let span = s * width..(s + 1) * width;
            r.add_row(id, &m[span.clone()], &v[span]);
        }
        Ok(r)
    }

    /// Row moments from dense (rows, width) ones (a checkpoint of an earlier version): every
    /// row whose m or v holds anything but zero. A row of zeros behaves exactly as one never
    /// touched, so the update that follows is the same.
    pub fn from_dense(m: &[f32], v: &[f32], width: usize) -> Self {
        let mut r = Self::new(width);
        for (id, (m, v)) in m.chunks(width).zip(v.chunks(width)).enumerate() {
            if m.iter().chain(v).any(|&x| x != 0.0) {
                r.add_row(id as u32, m, v);
            }
        }
        r
    }

    /// The rows held, in slot order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// What a checkpoint saves: the row ids and m and v as (ids.len(), width), in slot order.
    pub fn saved(&self) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
        let n = self.ids.len() * self.width;
        let flat = |blocks: &[Vec<f32>]| blocks.iter().flatten().take(n).copied().collect();
        (self.ids.clone(), flat(&self.m), flat(&self.v))
    }

    /// The dense (table_rows, width) m and v.
    pub fn to_dense(&self, table_rows: usize) -> (Vec<f32>, Vec<f32>) {
        let w = self.width;
        let (mut m, mut v) = (vec![0f32; table_rows * w], vec![0f32; table_rows * w]);
        for (s, &id) in self.ids.iter().enumerate() {
            let (b, r) = (s / BLOCK_ROWS, (s % BLOCK_ROWS) * w);
            let at = id as usize * w;
            m[at..at + w].copy_from_slice(&self.m[b][r..r + w]);
            v[at..at + w].copy_from_slice(&self.v[b][r..r + w]);
        }
        (m, v)
    }

    fn slot_of(&self, id: u32) -> Option<usize> {
        match self.slot.get(id as usize) {
            Some(&s) if s != NONE => Some(s as usize),
            _ => None,
        }
    }

    /// A slot for `id` holding `m` and `v`.
    fn add_row(&mut self, id: u32, m: &[f32], v: &[f32]) {
        let s = self.ids.len();
        if s.is_multiple_of(BLOCK_ROWS) {
            self.m.push(vec![0.0; BLOCK_ROWS * self.width]);
            self.v.push(vec![0.0; BLOCK_ROWS * self.width]);
        }
        let (b, r) = (s / BLOCK_ROWS, (s % BLOCK_ROWS) * self.width);
        self.m[b][r..r + self.width].copy_from_slice(m);
        self.v[b][r..r + self.width].copy_from_slice(v);
        if self.slot.len() <= id as usize {
            self.slot.resize(id as usize + 1, NONE);
        }
        self.slot[id as usize] = s as u32;
        self.ids.push(id);
    }

    /// One AdamW step of the table `w` (rows × width, row-major) with gradient `g`: every row
    /// ever touched (those of `g` first touched now, from zero moments) through `step_row`,
    /// with its gradient row or zeros; every other row times `keep`. Nothing is changed when
    /// the shapes disagree.
    pub fn update(
        &mut self,
        w: &mut [f32],
        g: &SummedRows,
        keep: f32,
        step_row: &RowStep,
    ) -> Result<()> {
        let width = self.width;
        let rows = w.len() / width.max(1);
        if rows * width != w.len() || g.table_dims() != (rows, width) {
            return Err(Error::Internal(format!(
                "AdamW row state of width {width}, a table of {} values, a gradient of {:?}",
                w.len(),
                g.table_dims()
            )));
        }
        if let Some(&id) = self.ids.iter().find(|&&id| id as usize >= rows) {
            return Err(Error::Internal(format!(
                "AdamW row state holds row {id} of a table of {rows} rows"
            )));
        }
        let zeros = vec![0f32; width];
        for &id in g.ids() {
            if self.slot_of(id).is_none() {
                self.add_row(id, &zeros, &zeros);
            }
        }
        let mut w_rows: Vec<Option<&mut [f32]>> = w.chunks_mut(width).map(Some).collect();
        let m_rows = self.m.iter_mut().flat_map(|b| b.chunks_mut(width));
        let v_rows = self.v.iter_mut().flat_map(|b| b.chunks_mut(width));
        let touched: Vec<_> = self
            .ids
            .iter()
            .zip(m_rows.zip(v_rows))
            .map(|(&id, (m, v))| {
                let w = w_rows[id as usize]
                    .take()
                    .expect("a slot per row: each row is taken once");
                (w, m, v, g.row(id).unwrap_or(&zeros))
            })
            .collect();
        touched
            .into_par_iter()
            .for_each(|(w, m, v, g)| step_row(w, m, v, g));
        // keep·w is the whole dense update of a row whose m, v and g are zero.
        if keep != 1.0 {
            w_rows
                .into_par_iter()
                .flatten()
                .for_each(|w| w.iter_mut().for_each(|x| *x *= keep));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_moments_come_back_in_their_slots_and_dense_ones_keep_their_nonzero_rows() {
        let mut r = RowMoments::new(2);
        r.add_row(4, &[1.0, 2.0], &[3.0, 4.0]);
        r.add_row(1, &[5.0, 6.0], &[7.0, 8.0]);
        let (ids, m, v) = r.saved();
        assert_eq!(
            (ids.as_slice(), m.as_slice()),
            (&[4u32, 1][..], &[1.0f32, 2.0, 5.0, 6.0][..])
        );
        let back = RowMoments::from_saved(&ids, &m, &v, 2).unwrap();
        assert_eq!(back.to_dense(5), r.to_dense(5));
        let (dm, dv) = r.to_dense(5);
        let from_dense = RowMoments::from_dense(&dm, &dv, 2);
        assert_eq!(from_dense.ids(), &[1, 4]);
        assert_eq!(from_dense.to_dense(5), (dm, dv));
        assert!(RowMoments::from_saved(&[1, 1], &[0.0; 4], &[0.0; 4], 2).is_err());
        assert!(RowMoments::from_saved(&[1], &[0.0; 3], &[0.0; 3], 2).is_err());
    }
}
