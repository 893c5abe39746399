//! Pooling (token embeddings -> one sentence embedding), as sentence-transformers'
//! `Pooling` module (6.2: `sentence_transformer/modules/pooling.py`, padded path), and L2
//! normalisation (`Normalize`).

use candle_core::{DType, Tensor, D};
use serde_json::{json, Map, Value};

use crate::data::batch::TokenBatch;
use crate::error::Result;

/// One way of pooling a row's tokens. Several may be on: their outputs are concatenated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token ([CLS]); with `include_prompt = false` the first token after the prompt.
    Cls,
    /// Element-wise maximum over the tokens.
    Max,
    /// Mean of the tokens.
    Mean,
    /// Sum of the tokens / sqrt(token count).
    MeanSqrtLen,
    /// Mean weighted by position (1, 2, 3, ...): later tokens count more.
    WeightedMean,
    /// The last token (decoder models).
    LastToken,
}

impl PoolingMode {
    /// In the order the legacy layout concatenates them, with (6.x name, legacy key).
    const ALL: [(PoolingMode, &'static str, &'static str); 6] = [
        (PoolingMode::Cls, "cls", "pooling_mode_cls_token"),
        (PoolingMode::Max, "max", "pooling_mode_max_tokens"),
        (PoolingMode::Mean, "mean", "pooling_mode_mean_tokens"),
        (
            PoolingMode::MeanSqrtLen,
            "mean_sqrt_len_tokens",
            "pooling_mode_mean_sqrt_len_tokens",
        ),
        (
            PoolingMode::WeightedMean,
            "weightedmean",
            "pooling_mode_weightedmean_tokens",
        ),
        (
            PoolingMode::LastToken,
            "lasttoken",
            "pooling_mode_lasttoken",
        ),
    ];

    /// The sentence-transformers 6.x name ("cls", "mean_sqrt_len_tokens", ...).
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(m, ..)| *m == self).unwrap().1
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, n, _)| *n == name)
            .map(|(m, ..)| *m)
    }
}

/// How `1_Pooling/config.json` spells the modes. Written back as read, so a folder stays
/// loadable by the sentence-transformers versions that could load it before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingLayout {
    /// 2.x to 5.x: `word_embedding_dimension` and one `pooling_mode_*` flag per mode.
    Legacy,
    /// 6.x: `embedding_dimension` and `pooling_mode` ("mean" or a list of names).
    V6,
}

/// `1_Pooling/config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolingConfig {
    /// Width of the token embeddings.
    pub dim: usize,
    /// In concatenation order (never empty).
    pub modes: Vec<PoolingMode>,
    /// False: the prompt's tokens are left out of pooling (INSTRUCTOR-style models).
    pub include_prompt: bool,
    pub layout: PoolingLayout,
}

impl PoolingConfig {
    pub fn mean(dim: usize) -> Self {
        Self {
            dim,
            modes: vec![PoolingMode::Mean],
            include_prompt: true,
            layout: PoolingLayout::Legacy,
        }
    }

    /// Reads either layout. The error is the problem, for the caller to put the path on.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("is not a JSON object")?;
        let dim_of = |key: &str| {
            obj.get(key).map(|d| {
                d.as_u64()
                    .ok_or(format!("`{key}` is not a positive integer"))
            })
        };
        let include_prompt = match obj.get("include_prompt") {
            None => true,
            Some(b) => b.as_bool().ok_or("`include_prompt` is not true or false")?,
        };
        if let Some(dim) = dim_of("embedding_dimension") {
            let names: Vec<&Value> = match obj.get("pooling_mode") {
                None => Vec::new(),
                Some(Value::Array(a)) => a.iter().collect(),
                Some(one) => vec![one],
            };
            let modes = names
                .iter()
                .map(|n| {
                    n.as_str().and_then(PoolingMode::from_name).ok_or_else(|| {
                        let known: Vec<&str> = PoolingMode::ALL.iter().map(|m| m.1).collect();
                        format!("pooling_mode {n} is not one of {}", known.join(", "))
                    })
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            return Ok(Self {
                dim: dim? as usize,
                // sentence-transformers' default.
                modes: if modes.is_empty() {
                    vec![PoolingMode::Mean]
                } else {
                    modes
                },
                include_prompt,
                layout: PoolingLayout::V6,
            });
        }
        let dim = dim_of("word_embedding_dimension").ok_or(
            "missing field `embedding_dimension` (6.x) or `word_embedding_dimension` (2.x-5.x)",
        )??;
        let mut modes = Vec::new();
        for (mode, _, key) in PoolingMode::ALL {
            match obj.get(key) {
                None | Some(Value::Bool(false)) => {}
                Some(Value::Bool(true)) => modes.push(mode),
                Some(other) => return Err(format!("`{key}` is {other}, not true or false")),
            }
        }
        Ok(Self {
            dim: dim as usize,
            // No flag on: sentence-transformers 6 reads it as mean pooling.
            modes: if modes.is_empty() {
                vec![PoolingMode::Mean]
            } else {
                modes
            },
            include_prompt,
            layout: PoolingLayout::Legacy,
        })
    }

    /// The config in the layout it was read in.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        match self.layout {
            PoolingLayout::V6 => {
                obj.insert("embedding_dimension".into(), json!(self.dim));
                let names: Vec<&str> = self.modes.iter().map(|m| m.name()).collect();
                let mode = match names.as_slice() {
                    [one] => json!(one),
                    many => json!(many),
                };
                obj.insert("pooling_mode".into(), mode);
            }
            PoolingLayout::Legacy => {
                obj.insert("word_embedding_dimension".into(), json!(self.dim));
                for (mode, _, key) in PoolingMode::ALL {
                    obj.insert(key.into(), json!(self.modes.contains(&mode)));
                }
            }
        }
        obj.insert("include_prompt".into(), json!(self.include_prompt));
        Value::Object(obj)
    }

    pub fn output_dim(&self) -> usize {
        self.modes.len() * self.dim
    }

    /// tokens: (tokens, hidden), rows packed as in `batch`. Returns (rows, out_dim), f32.
    pub fn forward(&self, tokens: &Tensor, batch: &TokenBatch) -> Result<Tensor> {
        let tokens = tokens.to_dtype(DType::F32)?;
        let dev = tokens.device();
        let (_, hidden) = tokens.dims2()?;
        // Tokens left out of each row's pooling: its prompt's (the [CLS] included), as
        // sentence-transformers masks the first `prompt_length` positions.
        let skip: Vec<usize> = batch
            .lengths
            .iter()
            .zip(&batch.prompt_tokens)
            .map(|(&l, &p)| if self.include_prompt { 0 } else { p.min(l) })
            .collect();
        let row_of: Vec<u32> = batch
            .rows()
            .enumerate()
            .flat_map(|(r, (_, l))| std::iter::repeat_n(r as u32, l))
            .collect();
        let row_of = Tensor::from_vec(row_of, batch.tokens(), dev)?;
        // Each token added into its row's sum, in token order: a row's sum does not depend
        // on the other rows (a (rows, tokens) x (tokens, hidden) product did, through the
        // depth blocking of the whole batch's tokens).
        let row_sums = |weights: Option<Vec<f32>>| -> Result<Tensor> {
            let x = match weights {
                Some(w) => tokens.broadcast_mul(&Tensor::from_vec(w, (batch.tokens(), 1), dev)?)?,
                None => tokens.clone(),
            };
            let zeros = Tensor::zeros((batch.len(), hidden), DType::F32, dev)?;
            Ok(zeros.index_add(&row_of, &x, 0)?)
        };
        let per_row = |v: Vec<f32>| Tensor::from_vec(v, (batch.len(), 1), dev);
        let pick = |at: Vec<u32>| -> Result<Tensor> {
            Ok(tokens.index_select(&Tensor::from_vec(at, batch.len(), dev)?, 0)?)
        };
        let mut mean_sum = None;
        let mut parts = Vec::new();
        for mode in &self.modes {
            let part = match mode {
                PoolingMode::Cls => pick(
                    batch
                        .rows()
                        .zip(&skip)
                        .map(|((o, l), &s)| (o + if s < l { s } else { 0 }) as u32)
                        .collect(),
                )?,
                PoolingMode::Max => {
                    let rows: Vec<Tensor> = batch
                        .rows()
                        .zip(&skip)
                        .map(|((o, l), &s)| {
                            if s < l {
                                tokens.narrow(0, o + s, l - s)?.max_keepdim(0)
                            } else {
                                Tensor::full(f32::NEG_INFINITY, (1, hidden), dev)
                            }
                        })
                        .collect::<candle_core::Result<_>>()?;
                    Tensor::cat(&rows, 0)?
                }
                PoolingMode::Mean | PoolingMode::MeanSqrtLen => {
                    if mean_sum.is_none() {
                        let masked = skip.iter().any(|&s| s > 0).then(|| {
                            batch
                                .lengths
                                .iter()
                                .zip(&skip)
                                .flat_map(|(&l, &s)| {
                                    (0..l).map(move |p| f32::from(u8::from(p >= s)))
                                })
                                .collect()
                        });
                        mean_sum = Some(row_sums(masked)?);
                    }
                    let counts: Vec<f32> = batch
                        .lengths
                        .iter()
                        .zip(&skip)
                        .map(|(&l, &s)| ((l - s) as f32).max(1e-9))
                        .collect();
                    let count = per_row(counts)?;
                    let count = if *mode == PoolingMode::Mean {
                        count
                    } else {
                        count.sqrt()?
                    };
                    mean_sum.as_ref().unwrap().broadcast_div(&count)?
                }
                PoolingMode::WeightedMean => {
                    let weight = |p: usize, s: usize| if p >= s { (p + 1) as f32 } else { 0.0 };
                    let weights = batch
                        .lengths
                        .iter()
                        .zip(&skip)
                        .flat_map(|(&l, &s)| (0..l).map(move |p| weight(p, s)))
                        .collect();
                    let totals = batch
                        .lengths
                        .iter()
                        .zip(&skip)
                        .map(|(&l, &s)| (0..l).map(|p| weight(p, s)).sum::<f32>().max(1e-9))
                        .collect();
                    row_sums(Some(weights))?.broadcast_div(&per_row(totals)?)?
                }
                PoolingMode::LastToken => {
                    let last = pick(batch.rows().map(|(o, l)| (o + l - 1) as u32).collect())?;
                    // A row whose every token is prompt pools to zeros, as the masked gather does.
                    let kept: Vec<f32> = batch
                        .lengths
                        .iter()
                        .zip(&skip)
                        .map(|(&l, &s)| f32::from(u8::from(s < l)))
                        .collect();
                    if kept.iter().all(|&k| k == 1.0) {
                        last
                    } else {
                        last.broadcast_mul(&per_row(kept)?)?
                    }
                }
            };
            parts.push(part);
        }
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }
}

/// x / max(‖x‖₂, 1e-12) per row, as torch.nn.functional.normalize.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_read_and_write_back_as_read() {
        let legacy = json!({"word_embedding_dimension": 4, "pooling_mode_cls_token": true,
                            "pooling_mode_mean_tokens": true});
        let p = PoolingConfig::from_json(&legacy).unwrap();
        assert_eq!(p.modes, vec![PoolingMode::Cls, PoolingMode::Mean]);
        assert_eq!((p.dim, p.include_prompt, p.output_dim()), (4, true, 8));
        let back = p.to_json();
        assert_eq!(back["pooling_mode_cls_token"], json!(true));
        assert_eq!(back["pooling_mode_lasttoken"], json!(false));
        assert_eq!(PoolingConfig::from_json(&back).unwrap(), p);

        let v6 = json!({"embedding_dimension": 4, "pooling_mode": ["lasttoken", "cls"],
                        "include_prompt": false});
        let p = PoolingConfig::from_json(&v6).unwrap();
        assert_eq!(p.modes, vec![PoolingMode::LastToken, PoolingMode::Cls]);
        assert!(!p.include_prompt);
        assert_eq!(p.to_json(), v6);
        let one = json!({"embedding_dimension": 4, "pooling_mode": "weightedmean", "include_prompt": true});
        assert_eq!(PoolingConfig::from_json(&one).unwrap().to_json(), one);
    }

    #[test]
    fn bad_pooling_configs_are_named() {
        let err = PoolingConfig::from_json(&json!({"pooling_mode": "mean"})).unwrap_err();
        assert!(err.contains("embedding_dimension"), "{err}");
        let err =
            PoolingConfig::from_json(&json!({"embedding_dimension": 4, "pooling_mode": "median"}))
                .unwrap_err();
        assert!(
            err.contains("median") && err.contains("weightedmean"),
            "{err}"
        );
    }

    #[test]
    fn every_mode_pools_as_sentence_transformers_masks_the_prompt() {
        let dev = candle_core::Device::Cpu;
        // Two rows of 3 and 2 tokens, hidden 1: values 1, 2, 3 | 10, 20.
        let tokens = Tensor::new(&[[1f32], [2.], [3.], [10.], [20.]], &dev).unwrap();
        let batch = TokenBatch::new(&[&[0, 0, 0], &[0, 0]], &dev)
            .unwrap()
            .with_prompt_tokens(vec![2, 2]);
        let pool = |modes: Vec<PoolingMode>, include_prompt: bool| {
            let cfg = PoolingConfig {
                dim: 1,
                modes,
                include_prompt,
                layout: PoolingLayout::V6,
            };
            cfg.forward(&tokens, &batch)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        use PoolingMode::*;
        let all = vec![Cls, Max, Mean, MeanSqrtLen, WeightedMean, LastToken];
        let w = (1. + 4. + 9.) / 6.;
        let s3 = 3f32.sqrt();
        assert_eq!(
            pool(all.clone(), true),
            vec![
                vec![1., 3., 2., 6. / s3, w, 3.],
                vec![10., 20., 15., 30. / 2f32.sqrt(), 50. / 3., 20.],
            ]
        );
        // Prompt of 2 tokens left out: row 1 keeps token 3 (weight 3), row 2 keeps nothing.
        assert_eq!(
            pool(all, false),
            vec![
                vec![3., 3., 3., 3., 3., 3.],
                vec![10., f32::NEG_INFINITY, 0., 0., 0., 0.],
            ]
        );
    }
}
