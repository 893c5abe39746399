//! Each `cuda` kernel against its CPU twin, on the same inputs (`st-tune bench kernels`, run by
//! scripts/gpu-check.sh): the dropout masks against `engine::mask`'s, the layer-norm backward
//! against the CPU engine's, AdamW over all parameters against the in-place CPU update. Where
//! st-tune's kernels do not run (a CPU, or a build without `cuda`), the device side is the
//! portable candle-op form the kernel replaces on CUDA, so the check runs end to end anywhere.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use crate::engine::cpu::primitives::Cpu;
use crate::engine::mask::{mix, AttentionMasks, HiddenMask};
use crate::engine::portable::{attention_mask_tensor, layer_norm_backward, mask_tensor};
use crate::engine::{Attention, Primitives};
use crate::error::Result;
use crate::train::optim::{AdamW, Grads};

/// One kernel's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct TwinCheck {
    pub kernel: &'static str,
    /// What ran on the device: st-tune's kernel, or the portable ops standing in for it.
    pub device_side: String,
    pub twin: &'static str,
    /// Largest |device - twin| over every output, and the largest |twin| (its scale).
    pub max_abs_diff: f32,
    pub max_abs: f32,
}

fn device_side(device: &Device) -> String {
    if cfg!(feature = "cuda") && device.is_cuda() {
        "cuda kernel".into()
    } else {
        format!(
            "portable ops on {} (no st-tune kernel here)",
            crate::device::name(device)
        )
    }
}

fn diff(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let d = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let m = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok((d, m))
}

/// Fixed pseudo-random values in [-1, 1) (the same on every machine).
fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| (mix(seed ^ i as u64) >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect()
}

fn tensor(n: usize, seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(values(n, seed), shape, device)?)
}

/// Runs every comparison on `device`.
pub fn check(device: &Device) -> Result<Vec<TwinCheck>> {
    Ok(vec![
        hidden_masks(device)?,
        attention_masks(device)?,
        norm_backward(device)?,
        adamw(device)?,
    ])
}

fn hidden_masks(device: &Device) -> Result<TwinCheck> {
    let (lengths, width) = ([5usize, 9, 3], 384);
    let keys = (0..3).map(|r| mix(11 + r)).collect();
    let m = HiddenMask::new(0.1, keys, &lengths);
    let got = mask_tensor(&m, width, device)?;
    let want = Tensor::from_vec(m.values(width), (m.tokens(), width), &Device::Cpu)?;
    let (max_abs_diff, max_abs) = diff(&got, &want)?;
    Ok(TwinCheck {
        kernel: "dropout masks, hidden states (17 tokens x 384)",
        device_side: device_side(device),
        twin: "engine::mask HiddenMask::values",
        max_abs_diff,
        max_abs,
    })
}

fn attention_masks(device: &Device) -> Result<TwinCheck> {
    let (lens, heads) = ([5usize, 9, 3], 4);
    let masks = AttentionMasks {
        p: 0.1,
        row_keys: (0..3).map(|r| mix(23 + r)).collect(),
    };
    let mut off = 0;
    let rows = lens
        .iter()
        .map(|&l| {
            off += l;
            (off - l, l)
        })
        .collect();
    let att = Attention {
        heads,
        scale: 1.0,
        rows,
        masks: Some(masks.clone()),
        window: None,
    };
    let got = attention_mask_tensor(&att, device)?
        .ok_or_else(|| crate::Error::Internal("attention dropout is on".into()))?;
    // The twin: each (row, head) block from fill_head, padded with zeros.
    let l = 9;
    let mut want = vec![0f32; lens.len() * heads * l * l];
    let mut block = vec![0f32; l * l];
    for (r, &len) in lens.iter().enumerate() {
        for h in 0..heads {
            masks.fill_head(r, h, len, &mut block);
            for i in 0..len {
                let at = ((r * heads + h) * l + i) * l;
                want[at..at + len].copy_from_slice(&block[i * len..(i + 1) * len]);
            }
        }
    }
    let want = Tensor::from_vec(want, (lens.len(), heads, l, l), &Device::Cpu)?;
    let (max_abs_diff, max_abs) = diff(&got, &want)?;
    Ok(TwinCheck {
        kernel: "dropout masks, attention (3 rows x 4 heads, padded to 9)",
        device_side: device_side(device),
        twin: "engine::mask AttentionMasks::fill_head",
        max_abs_diff,
        max_abs,
    })
}

fn norm_backward(device: &Device) -> Result<TwinCheck> {
    let (tokens, width, eps) = (37usize, 384usize, 1e-12f32);
    let s = (tensor(tokens * width, 1, &[tokens, width], &Device::Cpu)? * 3.0)?;
    let w = (tensor(width, 2, &[width], &Device::Cpu)? + 1.0)?;
    let g = tensor(tokens * width, 3, &[tokens, width], &Device::Cpu)?;
    let on = |t: &Tensor| t.to_device(device);
    let (ds, dw, db) = layer_norm_backward(&on(&s)?, &on(&w)?, eps, &on(&g)?)?;
    // The CPU engine's add_norm backward over s + 0, no dropout.
    let zero = s.zeros_like()?;
    let cpu = Cpu { dtype: DType::F32 };
    let (ws, ww, wb) = cpu.add_norm_backward(&s, &zero, None, &w, eps, &g)?;
    let mut worst = (0f32, 0f32);
    for (a, b) in [(&ds, &ws), (&dw, &ww), (&db, &wb)] {
        let (d, m) = diff(a, b)?;
        worst = (worst.0.max(d / m.max(1e-30)), worst.1.max(m));
    }
    Ok(TwinCheck {
        kernel: "layer-norm backward (37 x 384): d input, d weight, d bias, relative",
        device_side: device_side(device),
        twin: "cpu engine add_norm_backward (engine/cpu/norm.rs)",
        max_abs_diff: worst.0,
        max_abs: 1.0,
    })
}

fn adamw(device: &Device) -> Result<TwinCheck> {
    // Sizes around the kernel's block and grid boundaries; names that do and do not decay.
    let shapes: [(&str, usize); 5] = [
        ("a.weight", 1000),
        ("a.bias", 384),
        ("b.LayerNorm.weight", 7),
        ("c.weight", 40_000),
        ("d.weight", 1),
    ];
    let run = |device: &Device, in_place: bool| -> Result<Vec<Tensor>> {
        let mut vars = BTreeMap::new();
        for (i, &(name, n)) in shapes.iter().enumerate() {
            let v = Var::from_tensor(&tensor(n, 100 + i as u64, &[n], device)?)?;
            vars.insert(name.to_string(), v);
        }
        let mut opt = AdamW::new(0.01);
        opt.in_place = in_place;
        for step in 0..3u64 {
            let grads: Grads = shapes
                .iter()
                .enumerate()
                .map(|(i, &(name, n))| {
                    let seed = 1000 * (step + 1) + i as u64;
                    Ok((name.to_string(), tensor(n, seed, &[n], device)?.into()))
                })
                .collect::<Result<_>>()?;
            opt.step(&vars, &grads, 0.7, 1e-3, &mut BTreeSet::new(), || Ok(()))?;
        }
        Ok(vars.values().map(|v| v.as_tensor().clone()).collect())
    };
    let got = run(device, false)?;
    let want = run(&Device::Cpu, true)?;
    let mut worst = (0f32, 0f32);
    for (a, b) in got.iter().zip(&want) {
        let (d, m) = diff(a, b)?;
        worst = (worst.0.max(d), worst.1.max(m));
    }
    Ok(TwinCheck {
        kernel: "AdamW over 5 tensors (41,392 values), 3 steps: weights",
        device_side: device_side(device),
        twin: "train::optim in-place CPU update",
        max_abs_diff: worst.0,
        max_abs: worst.1,
    })
}
