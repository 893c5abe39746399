//! The primitives over st-tune's CPU kernels: each reads its inputs in place as f32 slices
//! (widening half precision on every core), runs one kernel, and stores the result in the
//! activations' type. Matrix products go through the one dispatch of `matmul.rs`.

use std::borrow::Cow;

use candle_core::{DType, Device, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::matmul::{self, Products};
use super::storage::{cpu_f32, tensor, with_slice};
use super::{norm, rotary, vmath};
use crate::engine::mask::HiddenMask;
use crate::engine::rotary::Rotary;
use crate::engine::{Attention, LinearGrads, NormGrads, Primitives};
use crate::error::Result;

/// The CPU engine, for activations stored as `dtype`.
pub struct Cpu {
    pub dtype: DType,
}

/// Runs `f` over the elements of a CPU tensor as f32 (borrowed in place when f32).
fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        return Err(candle_core::Error::Msg("cpu engine: expected a CPU tensor".into()).into());
    };
    let v: Cow<[f32]> = cpu_f32(s, l, "cpu engine")?;
    f(&v)
}

fn f32_tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// `x + mask ⊙ y`, rows of `width` (the packed tokens, as the masks number them).
fn add_masked(x: &[f32], y: &[f32], mask: Option<&HiddenMask>, width: usize) -> Vec<f32> {
    let mut out = y.to_vec();
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .enumerate()
        .for_each(|(t, (o, x))| {
            if let Some(m) = mask {
                m.apply_row(t, o);
            }
            o.iter_mut().zip(x).for_each(|(o, x)| *o += x);
        });
    out
}

/// Runs `f` on a step's sums held in `parts`, one after another: in place for one tensor,
/// else on a copy written back after (each element's chain is its own, so the copy changes no
/// bits: q, k and v share one product).
fn with_sums<R: Send>(
    parts: &[&Tensor],
    f: impl FnOnce(&mut [f32]) -> Result<R> + Send,
) -> Result<R> {
    let mut f = Some(f);
    let mut out = None;
    if let [one] = parts {
        with_slice(one, |v| {
            out = f.take().map(|f| f(v));
            Ok(())
        })?;
        return out.expect("with_slice runs its closure");
    }
    let mut all = Vec::new();
    for p in parts {
        with_slice(p, |v| {
            all.extend_from_slice(v);
            Ok(())
        })?;
    }
    let out = f.take().expect("once")(&mut all)?;
    let mut at = 0;
    for p in parts {
        with_slice(p, |v| {
            v.copy_from_slice(&all[at..at + v.len()]);
            at += v.len();
            Ok(())
        })?;
    }
    Ok(out)
}

impl Cpu {
    fn products(&self) -> Products {
        Products::for_dtype(self.dtype)
    }

    fn store(&self, v: Vec<f32>, rows: usize, cols: usize) -> Result<Tensor> {
        Ok(tensor(
            v,
            self.dtype,
            &Shape::from((rows, cols)),
            &Device::Cpu,
        )?)
    }
}

impl Primitives for Cpu {
    fn dtype(&self) -> DType {
        self.dtype
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (n, k) = w.dims2()?;
        let y = read(x, |x| {
            read(w, |w| {
                read(b, |b| Ok(matmul::linear(self.products(), x, w, b, k)?))
            })
        })?;
        self.store(y, x.dim(0)?, n)
    }

    fn linear_backward(&self, dy: &Tensor, x: &Tensor, w: &Tensor) -> Result<LinearGrads> {
        let (n, k) = w.dims2()?;
        let (mut dw, mut db) = (vec![0f32; n * k], vec![0f32; n]);
        let dx = read(dy, |dy| {
            read(x, |x| {
                read(w, |w| {
                    Ok(matmul::linear_backward(
                        self.products(),
                        dy,
                        x,
                        w,
                        (&mut dw, &mut db),
                        k,
                    )?)
                })
            })
        })?;
        Ok((
            f32_tensor(dx, (x.dim(0)?, k))?,
            f32_tensor(dw, (n, k))?,
            f32_tensor(db, n)?,
        ))
    }

    fn sums_in_order(&self) -> bool {
        self.dtype == DType::F32
    }

    fn linear_backward_into(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        dw: &[&Tensor],
        db: &[&Tensor],
    ) -> Result<Tensor> {
        let k = w.dim(1)?;
        let dx = with_sums(dw, |dw| {
            with_sums(db, |db| {
                read(dy, |dy| {
                    read(x, |x| {
                        read(w, |w| {
                            Ok(matmul::linear_backward_in_order(dy, x, w, (dw, db), k)?)
                        })
                    })
                })
            })
        })?;
        f32_tensor(dx, (x.dim(0)?, k))
    }

    fn add_norm_backward_into(
        &self,
        x: &Tensor,
        y: &Tensor,
        mask: Option<&HiddenMask>,
        w: &Tensor,
        eps: f32,
        g: &Tensor,
        (dw, db): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let (t, h) = x.dims2()?;
        let s = read(x, |x| read(y, |y| Ok(add_masked(x, y, mask, h))))?;
        let ds = with_sums(&[dw], |dw| {
            with_sums(&[db], |db| {
                read(g, |g| {
                    read(w, |w| {
                        Ok(norm::norm_rows_backward_in_order(&s, g, w, eps, (dw, db))?)
                    })
                })
            })
        })?;
        f32_tensor(ds, (t, h))
    }

    fn attention_backward_into(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        att: &Attention,
        d: &Tensor,
        bucket_of: &[u32],
        sums: &Tensor,
    ) -> Result<Tensor> {
        let (t, w) = qkv.dims2()?;
        let (l, (buckets, heads)) = (bias.dim(1)?, sums.dims2()?);
        if heads != att.heads
            || bucket_of.len() != l * l
            || att.rows.iter().any(|&(_, len)| len > l)
            || bucket_of.iter().any(|&b| b as usize >= buckets)
        {
            return Err(crate::Error::Internal(format!(
                "attention bias sums {:?}: {} heads, {} bucket numbers for L = {l}",
                sums.dims(),
                att.heads,
                bucket_of.len()
            )));
        }
        let dqkv = with_sums(&[sums], |s| {
            read(qkv, |q| {
                read(d, |d| {
                    read(bias, |b| {
                        Ok(att.backward_slices_into(q, (b, l), bucket_of, s, d, w))
                    })
                })
            })
        })?;
        f32_tensor(dqkv, (t, w))
    }

    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        let mut act = read(x, |x| Ok(x.to_vec()))?;
        act.par_chunks_mut(1 << 14).for_each(vmath::gelu);
        let (t, i) = x.dims2()?;
        self.store(act, t, i)
    }

    fn gelu_backward(&self, x: &Tensor, d: &Tensor) -> Result<Tensor> {
        let (t, i) = x.dims2()?;
        let mut grad = read(x, |x| Ok(x.to_vec()))?;
        read(d, |d| {
            grad.par_chunks_mut(i)
                .zip(d.par_chunks(i))
                .for_each(|(x, d)| vmath::gelu_grad_mul(x, d));
            Ok(())
        })?;
        f32_tensor(grad, (t, i))
    }

    fn add_norm(
        &self,
        x: &Tensor,
        y: &Tensor,
        mask: Option<&HiddenMask>,
        (w, b): (&Tensor, &Tensor),
        eps: f32,
    ) -> Result<Tensor> {
        let (t, h) = x.dims2()?;
        let mut s = read(x, |x| read(y, |y| Ok(add_masked(x, y, mask, h))))?;
        read(w, |w| {
            read(b, |b| {
                norm::norm_rows(&mut s, w, b, eps);
                Ok(())
            })
        })?;
        self.store(s, t, h)
    }

    fn add_norm_backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        mask: Option<&HiddenMask>,
        w: &Tensor,
        eps: f32,
        g: &Tensor,
    ) -> Result<NormGrads> {
        let (t, h) = x.dims2()?;
        let s = read(x, |x| read(y, |y| Ok(add_masked(x, y, mask, h))))?;
        let (ds, mut dwb) = read(g, |g| {
            read(w, |w| Ok(norm::norm_rows_backward(&s, g, w, eps)?))
        })?;
        drop(s);
        let db = dwb.split_off(h);
        Ok((
            f32_tensor(ds, (t, h))?,
            f32_tensor(dwb, h)?,
            f32_tensor(db, h)?,
        ))
    }

    fn masked(&self, g: &Tensor, mask: Option<&HiddenMask>) -> Result<Tensor> {
        let Some(m) = mask else {
            return Ok(g.to_dtype(DType::F32)?);
        };
        let (t, h) = g.dims2()?;
        let mut out = read(g, |g| Ok(g.to_vec()))?;
        out.par_chunks_mut(h)
            .enumerate()
            .for_each(|(t, o)| m.apply_row(t, o));
        f32_tensor(out, (t, h))
    }

    fn attention(&self, qkv: &Tensor, bias: Option<&Tensor>, att: &Attention) -> Result<Tensor> {
        let (t, w) = qkv.dims2()?;
        let ctx = read(qkv, |q| match bias {
            Some(b) => {
                let l = b.dim(1)?;
                read(b, |b| Ok(att.forward_cpu(q, Some((b, l)), w)))
            }
            None => Ok(att.forward_cpu(q, None, w)),
        })?;
        self.store(ctx, t, w / 3)
    }

    fn attention_backward(
        &self,
        qkv: &Tensor,
        bias: Option<&Tensor>,
        att: &Attention,
        d: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (t, w) = qkv.dims2()?;
        let (dqkv, dbias) = read(qkv, |q| {
            read(d, |d| match bias {
                Some(b) => {
                    let l = b.dim(1)?;
                    read(b, |b| Ok(att.backward_slices(q, Some((b, l)), d, w)))
                }
                None => Ok(att.backward_slices(q, None, d, w)),
            })
        })?;
        let dbias = match bias {
            Some(b) => Some(f32_tensor(dbias, b.shape())?),
            None => None,
        };
        Ok((f32_tensor(dqkv, (t, w))?, dbias))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut sum = read(a, |a| Ok(a.to_vec()))?;
        read(b, |b| {
            sum.par_chunks_mut(1 << 14)
                .zip(b.par_chunks(1 << 14))
                .for_each(|(s, b)| s.iter_mut().zip(b).for_each(|(s, b)| *s += b));
            Ok(())
        })?;
        f32_tensor(sum, a.shape())
    }

    fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        if t.dtype() == dtype {
            return Ok(t.clone());
        }
        let v = read(t, |v| Ok(v.to_vec()))?;
        Ok(tensor(v, dtype, t.shape(), &Device::Cpu)?)
    }

    fn norm(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        let (t, h) = x.dims2()?;
        let mut s = read(x, |x| Ok(x.to_vec()))?;
        read(w, |w| match b {
            Some(b) => read(b, |b| {
                norm::norm_rows(&mut s, w, b, eps);
                Ok(())
            }),
            None => {
                norm::norm_rows(&mut s, w, &vec![0f32; h], eps);
                Ok(())
            }
        })?;
        self.store(s, t, h)
    }

    fn norm_backward(&self, x: &Tensor, w: &Tensor, eps: f32, g: &Tensor) -> Result<NormGrads> {
        let (t, h) = x.dims2()?;
        let (dx, mut dwb) = read(x, |x| {
            read(g, |g| {
                read(w, |w| Ok(norm::norm_rows_backward(x, g, w, eps)?))
            })
        })?;
        let db = dwb.split_off(h);
        Ok((
            f32_tensor(dx, (t, h))?,
            f32_tensor(dwb, h)?,
            f32_tensor(db, h)?,
        ))
    }

    fn rotary(&self, qkv: &Tensor, rope: &Rotary) -> Result<Tensor> {
        let (t, w) = qkv.dims2()?;
        let out = self.rotated(qkv, rope, 1.0)?;
        self.store(out, t, w)
    }

    fn rotary_backward(&self, d: &Tensor, rope: &Rotary) -> Result<Tensor> {
        let out = self.rotated(d, rope, -1.0)?;
        f32_tensor(out, d.shape())
    }

    fn geglu(&self, h: &Tensor) -> Result<Tensor> {
        let (t, w) = h.dims2()?;
        let i = w / 2;
        let mut act = vec![0f32; t * i];
        read(h, |h| {
            act.par_chunks_mut(i)
                .zip(h.par_chunks(w))
                .for_each(|(a, h)| {
                    let (input, gate) = h.split_at(i);
                    a.copy_from_slice(input);
                    vmath::gelu(a);
                    a.iter_mut().zip(gate).for_each(|(a, g)| *a *= g);
                });
            Ok(())
        })?;
        self.store(act, t, i)
    }

    fn geglu_backward(&self, h: &Tensor, d: &Tensor) -> Result<Tensor> {
        let (t, w) = h.dims2()?;
        let i = w / 2;
        // d input = d ⊙ gate ⊙ gelu'(input), d gate = d ⊙ gelu(input).
        let mut grad = read(h, |h| Ok(h.to_vec()))?;
        read(d, |d| {
            grad.par_chunks_mut(w)
                .zip(d.par_chunks(i))
                .for_each(|(row, d)| {
                    let (input, gate) = row.split_at_mut(i);
                    let mut act = input.to_vec();
                    vmath::gelu(&mut act);
                    let d_input: Vec<f32> = d.iter().zip(gate.iter()).map(|(d, g)| d * g).collect();
                    vmath::gelu_grad_mul(input, &d_input);
                    gate.iter_mut()
                        .zip(d.iter().zip(&act))
                        .for_each(|(g, (d, a))| *g = d * a);
                });
            Ok(())
        })?;
        f32_tensor(grad, (t, w))
    }
}

impl Cpu {
    /// `x` (tokens, 3·hidden) as f32 with q and k rotated by `sign` times their angles.
    fn rotated(&self, x: &Tensor, rope: &Rotary, sign: f32) -> Result<Vec<f32>> {
        let (_, w) = x.dims2()?;
        let mut out = read(x, |x| Ok(x.to_vec()))?;
        read(&rope.cos, |c| {
            read(&rope.sin, |s| {
                rotary::rotate(&mut out, w / 3, rope.heads, c, s, sign);
                Ok(())
            })
        })?;
        Ok(out)
    }
}
