//! Helpers shared by the integration tests: where the real weights are, and a tiny randomly
//! initialised model (BERT or MPNet shaped) written to a temporary folder on the fly.
#![allow(dead_code)]

use std::collections::HashMap;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

/// A real model folder fetched by scripts/fetch-weights.sh (ST_TUNE_WEIGHTS or ./.weights).
/// Panics with the command to run when it is missing: CI always fetches them.
pub fn real_model(name: &str) -> PathBuf {
    let root = std::env::var("ST_TUNE_WEIGHTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".weights"));
    let dir = root.join(name);
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/fetch-weights.sh first",
        dir.display()
    );
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

const VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", "<pad>", "a", "the", "cat", "dog",
    "sat", "on", "mat", "is", "man", "woman", "playing", "guitar", "plane", "taking", "off", "big",
    "small", "red", "blue", "runs", "fast", "##s", "##ing", ".", ",", "!", "?", "x", "y", "z",
];

/// A WordPiece tokenizer.json over `VOCAB`, lower-casing, with [CLS]/[SEP] (BERT) or <s>/</s>
/// (MPNet) around each text.
fn tokenizer_json(mpnet: bool) -> serde_json::Value {
    let vocab: HashMap<&str, usize> = VOCAB.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let (cls, sep) = if mpnet {
        ("<s>", "</s>")
    } else {
        ("[CLS]", "[SEP]")
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                        "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": cls, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": sep, "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                cls: {"id": cls, "ids": [vocab[cls]], "tokens": [cls]},
                sep: {"id": sep, "ids": [vocab[sep]], "tokens": [sep]}
            }
        },
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

/// Writes a tiny sentence-transformers folder with random weights: `layers` encoder layers,
/// hidden 16, 2 heads. `mpnet` picks the architecture.
pub fn tiny_model(dir: &Path, mpnet: bool, layers: usize, seed: u64) {
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    let (h, inter, heads, max_pos) = (16usize, 32usize, 2usize, 64usize);
    let v = VOCAB.len();
    let mut config = json!({
        "model_type": if mpnet { "mpnet" } else { "bert" },
        "vocab_size": v, "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": heads, "intermediate_size": inter,
        "max_position_embeddings": max_pos, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    });
    if mpnet {
        config["layer_norm_eps"] = json!(1e-5);
        config["pad_token_id"] = json!(1);
        config["relative_attention_num_buckets"] = json!(32);
    } else {
        config["type_vocab_size"] = json!(2);
        config["layer_norm_eps"] = json!(1e-12);
    }
    let w = |s: &str| s.to_string();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        tokenizer_json(mpnet).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("modules.json"),
        json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        ])
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("sentence_bert_config.json"),
        json!({"max_seq_length": 32, "do_lower_case": false}).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        json!({"word_embedding_dimension": h, "pooling_mode_mean_tokens": true}).to_string(),
    )
    .unwrap();

    let dev = Device::Cpu;
    let mut rng_state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut rand = |shape: &[usize], scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                rng_state = rng_state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((rng_state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(data, shape, &dev).unwrap()
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let ln = |t: &mut HashMap<String, Tensor>,
              name: &str,
              rand: &mut dyn FnMut(&[usize], f32) -> Tensor| {
        t.insert(format!("{name}.weight"), (rand(&[h], 0.1) + 1.0).unwrap());
        t.insert(format!("{name}.bias"), rand(&[h], 0.1));
    };
    let lin = |t: &mut HashMap<String, Tensor>,
               name: &str,
               i: usize,
               o: usize,
               rand: &mut dyn FnMut(&[usize], f32) -> Tensor| {
        t.insert(format!("{name}.weight"), rand(&[o, i], 0.3));
        t.insert(format!("{name}.bias"), rand(&[o], 0.1));
    };
    t.insert(w("embeddings.word_embeddings.weight"), rand(&[v, h], 1.0));
    t.insert(
        w("embeddings.position_embeddings.weight"),
        rand(&[max_pos, h], 0.5),
    );
    ln(&mut t, "embeddings.LayerNorm", &mut rand);
    if mpnet {
        t.insert(
            w("encoder.relative_attention_bias.weight"),
            rand(&[32, heads], 0.5),
        );
    } else {
        t.insert(
            w("embeddings.token_type_embeddings.weight"),
            rand(&[2, h], 0.5),
        );
    }
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        let names: [String; 4] = if mpnet {
            ["q", "k", "v", "o"].map(|x| format!("{p}.attention.attn.{x}"))
        } else {
            [
                format!("{p}.attention.self.query"),
                format!("{p}.attention.self.key"),
                format!("{p}.attention.self.value"),
                format!("{p}.attention.output.dense"),
            ]
        };
        for n in &names {
            lin(&mut t, n, h, h, &mut rand);
        }
        let attn_ln = if mpnet {
            format!("{p}.attention.LayerNorm")
        } else {
            format!("{p}.attention.output.LayerNorm")
        };
        ln(&mut t, &attn_ln, &mut rand);
        lin(
            &mut t,
            &format!("{p}.intermediate.dense"),
            h,
            inter,
            &mut rand,
        );
        lin(&mut t, &format!("{p}.output.dense"), inter, h, &mut rand);
        ln(&mut t, &format!("{p}.output.LayerNorm"), &mut rand);
    }
    lin(&mut t, "pooler.dense", h, h, &mut rand);
    let t: HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

const WORDS: [&str; 16] = [
    "the", "cat", "sat", "on", "mat", "dog", "man", "woman", "playing", "guitar", "plane", "big",
    "small", "red", "blue", "runs",
];

/// 24 rows of word salad; row i's texts have lengths that vary with i, so batches pad.
pub fn write_data(path: &Path, scored: bool) {
    let mut out = String::from(if scored {
        "sentence1,sentence2,score\n"
    } else {
        "anchor,positive\n"
    });
    for i in 0..24usize {
        let text = |k: usize, n: usize| -> String {
            (0..n)
                .map(|j| WORDS[(i * 7 + j * 3 + k) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (a, b) = (text(0, 3 + i % 5), text(1, 2 + i % 7));
        if scored {
            out.push_str(&format!("{a},{b},{}\n", (i % 6) as f32 / 5.0));
        } else {
            out.push_str(&format!("{a},{b}\n"));
        }
    }
    std::fs::write(path, out).unwrap();
}

pub fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("final/model.safetensors"), &Device::Cpu).unwrap()
}

/// Largest per-tensor relative difference, and the name of that tensor.
pub fn max_relative_difference(a: &Path, b: &Path) -> (f32, String) {
    let (wa, wb) = (weights(a), weights(b));
    let mut worst = (0f32, String::new());
    for (name, ta) in &wa {
        // The attention key bias adds the same q·b to every score of a query, which softmax
        // ignores: its true gradient is exactly 0 and what it gets is rounding noise, which
        // AdamW scales up to full ±lr steps. It carries no signal to compare.
        let key_bias = ["key.bias", "attn.k.bias", "k_lin.bias"];
        if !ta.dtype().is_float() || key_bias.iter().any(|k| name.ends_with(k)) {
            continue;
        }
        let d = max_abs_diff(ta, &wb[name]);
        let scale = max_abs(ta).max(1e-12);
        if d / scale > worst.0 {
            worst = (d / scale, name.clone());
        }
    }
    worst
}

/// max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// max |t| over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// What one `st-tune` process left: its exit code and its output.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the st-tune binary offline on one thread, with `ST_TUNE_INJECT_OOM=inject` if given
/// (and never the caller's own).
pub fn st_tune(args: &[&str], inject: Option<&str>) -> Run {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_st-tune"));
    cmd.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("ST_TUNE_INJECT_OOM");
    if let Some(spec) = inject {
        cmd.env("ST_TUNE_INJECT_OOM", spec);
    }
    let out = cmd.output().expect("the st-tune binary runs");
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `st-tune train --config CONFIG --json`, with `inject` OOMs.
pub fn train_json(config: &Path, inject: Option<&str>) -> Run {
    st_tune(
        &["train", "--config", config.to_str().unwrap(), "--json"],
        inject,
    )
}

/// The `data` of a successful JSON run's summary event.
pub fn summary(run: &Run) -> serde_json::Value {
    assert_eq!(run.code, 0, "train failed:\n{}", run.stderr);
    let last = run.stdout.lines().rev().find(|l| l.contains("final_loss"));
    let event: serde_json::Value = serde_json::from_str(last.expect("a JSON summary")).unwrap();
    event["data"].clone()
}

/// A step's gradients, each dense: the word table's summed rows written into a zeroed table.
pub type DenseGrads = std::collections::BTreeMap<String, Tensor>;

/// [`DenseGrads`] of a step's gradients.
pub fn dense(grads: st_tune::train::optim::Grads) -> DenseGrads {
    grads
        .into_iter()
        .map(|(name, g)| (name, g.dense(&Device::Cpu).unwrap()))
        .collect()
}
