//! Property tests of every parser of user files: arbitrary bytes, and arbitrary values in the
//! places a user writes them, into the config and `--set`, the sweep file, the data readers
//! (CSV, TSV, JSON lines, corpus) and the checkpoint readers (manifest.json, state.json, the
//! tensors, run_state.json). The property: a value or a typed error, never a panic (a panic
//! fails the test; a hang would never finish it).
//!
//! `cargo test` runs a few hundred cases per parser (seconds); `PROPTEST_CASES=N` runs more,
//! as the campaign recorded in docs/reliability.md did.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use st_tune::config::{all_keys, Config, Precision};
use st_tune::data::read::{read_corpus, read_dataset, read_eval_file, Format};
use st_tune::memory::policy::{MemState, RunState};
use st_tune::sweep::spec::Sweep;
use st_tune::train::checkpoint::{self, Progress};
use st_tune::train::optim::{AdamW, Grads};
use st_tune::train::precision::LossScaler;
use tempfile::TempDir;

/// `ci` cases unless `PROPTEST_CASES` asks for another number; no regression files written.
fn cases(ci: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..600)
}

/// Text made of the characters that mean something to TOML, CSV, TSV and JSON.
fn syntax_text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9_.=\\[\\]{}\"',:;# \\t\\n\\r\\\\e+-]{0,300}").unwrap()
}

/// A TOML value, well formed or not, of every type and of extreme sizes.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("-inf".to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        Just("true".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("\"auto\"".to_string()),
        Just("\"80%\"".to_string()),
        Just("\"1e30GiB\"".to_string()),
        Just("\"18446744073709551616B\"".to_string()),
        Just("[384, 256, 0]".to_string()),
        Just("[1.0, -1.0]".to_string()),
        Just("[\"bf16\", \"f16\", \"bf16\"]".to_string()),
        "[a-z0-9%._ -]{0,12}".prop_map(|s| format!("{s:?}")),
        proptest::collection::vec(any::<i32>(), 0..5).prop_map(|v| format!("{v:?}")),
        syntax_text(),
    ]
}

/// `section.key`: a real key most of the time, an unknown or malformed one sometimes.
fn key() -> impl Strategy<Value = String> {
    let real: Vec<String> = all_keys().map(|k| k.full_key()).collect();
    prop_oneof![
        4 => proptest::sample::select(real),
        1 => "[a-z._]{0,16}",
    ]
}

/// A config document: `[section]` tables of real keys with arbitrary values.
fn config_text() -> impl Strategy<Value = String> {
    proptest::collection::vec((key(), toml_value()), 0..8).prop_map(|entries| {
        let mut by_section: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for (k, v) in entries {
            let (s, k) = k.split_once('.').unwrap_or(("train", k.as_str()));
            by_section
                .entry(s.to_string())
                .or_default()
                .push((k.to_string(), v));
        }
        let mut text = String::new();
        for (section, entries) in by_section {
            text.push_str(&format!("[{section}]\n"));
            for (k, v) in entries {
                text.push_str(&format!("{k:?} = {v}\n"));
            }
        }
        text
    })
}

/// Everything a config is used for after parsing, so a value that parses but breaks a later
/// step is caught too.
fn use_config(c: Config) {
    let _ = c.validate();
    let _ = c.flat();
    let _ = toml::to_string(&c);
    let _ = c.train.micro_batch();
    let _ = c.memory.limit.as_ref().map(|l| l.bytes_of(1 << 34));
}

proptest! {
    #![proptest_config(cases(400))]

    #[test]
    fn config_text_of_arbitrary_bytes_is_a_config_or_a_typed_error(b in bytes()) {
        if let Ok(c) = Config::from_toml(&String::from_utf8_lossy(&b), "fuzz.toml", &[]) {
            use_config(c);
        }
    }

    #[test]
    fn config_documents_of_arbitrary_values_are_a_config_or_a_typed_error(text in config_text()) {
        if let Ok(c) = Config::from_toml(&text, "fuzz.toml", &[]) {
            use_config(c);
        }
    }

    #[test]
    fn set_overrides_of_arbitrary_values_are_a_config_or_a_typed_error(
        sets in proptest::collection::vec(
            prop_oneof![
                (key(), toml_value()).prop_map(|(k, v)| format!("{k}={v}")),
                syntax_text(),
            ],
            0..5,
        ),
        base in config_text(),
    ) {
        if let Ok(c) = Config::from_toml(&base, "fuzz.toml", &sets) {
            use_config(c);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sweep files
// ---------------------------------------------------------------------------------------------

/// A folder with a valid base config, `base.toml`, for sweep files to point at.
fn sweep_folder() -> TempDir {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("train.csv");
    common::write_data(&data, true);
    std::fs::write(
        dir.path().join("base.toml"),
        format!("[model]\npath = \"model\"\n[data]\ntrain = {data:?}\ndev = {data:?}\n"),
    )
    .unwrap();
    dir
}

fn sweep_text() -> impl Strategy<Value = String> {
    let sweep_keys = proptest::sample::select(vec![
        "base", "dir", "method", "trials", "seed", "metric", "goal", "other",
    ]);
    let sweep_value = prop_oneof![
        Just("\"base.toml\"".to_string()),
        Just("\"grid\"".to_string()),
        Just("\"random\"".to_string()),
        Just("\"tpe\"".to_string()),
        Just("\"dev.spearman\"".to_string()),
        Just("\"train.loss\"".to_string()),
        Just("\"min\"".to_string()),
        Just("18446744073709551615".to_string()),
        Just("9223372036854775807".to_string()),
        toml_value(),
    ];
    let prune_keys = proptest::sample::select(vec![
        "method", "min_rows", "reduction", "min_trials", "other",
    ]);
    let space_value = prop_oneof![
        proptest::collection::vec(toml_value(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        Just("{ log_uniform = [1e-6, 1e-3] }".to_string()),
        Just("{ uniform = [1.0, 0.0] }".to_string()),
        Just("{ int = [1, 9223372036854775807] }".to_string()),
        toml_value().prop_map(|v| format!("{{ uniform = [0, {v}] }}")),
        toml_value(),
    ];
    (
        proptest::collection::vec((sweep_keys, sweep_value), 0..6),
        proptest::collection::vec((key(), space_value), 0..4),
        proptest::collection::vec((prune_keys, toml_value()), 0..3),
        any::<bool>(),
    )
        .prop_map(|(sweep, space, prune, with_base)| {
            let mut text = String::from("[sweep]\n");
            if with_base {
                text.push_str("base = \"base.toml\"\n");
            }
            let mut seen = std::collections::BTreeSet::new();
            for (k, v) in sweep {
                if !(with_base && k == "base") && seen.insert(k) {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
            text.push_str("[space]\n");
            for (k, v) in space {
                text.push_str(&format!("{k:?} = {v}\n"));
            }
            if !prune.is_empty() {
                text.push_str("[prune]\n");
            }
            for (k, v) in prune {
                text.push_str(&format!("{k} = {v}\n"));
            }
            text
        })
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn sweep_files_of_arbitrary_bytes_are_a_sweep_or_a_typed_error(b in bytes()) {
        let dir = sweep_folder();
        let file = dir.path().join("sweep.toml");
        std::fs::write(&file, b).unwrap();
        let _ = Sweep::load(&file);
    }

    #[test]
    fn sweep_files_of_arbitrary_values_are_a_sweep_or_a_typed_error(text in sweep_text()) {
        let dir = sweep_folder();
        let file = dir.path().join("sweep.toml");
        std::fs::write(&file, &text).unwrap();
        if let Ok(s) = Sweep::load(&file) {
            // What `sweep plan` and `sweep run` do first with a sweep: its trials' keys.
            for i in 0..s.trials.min(3) {
                let _ = st_tune::sweep::trials::params(&s, i);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Data files
// ---------------------------------------------------------------------------------------------

/// A CSV, TSV or JSON lines document: a header of role names (real or not) and rows of
/// arbitrary fields, quoted or not.
fn data_text() -> impl Strategy<Value = (String, &'static str)> {
    let role = proptest::sample::select(vec![
        "anchor", "positive", "negative", "sentence1", "sentence2", "score", "label", "query",
        "", "x",
    ]);
    let field = prop_oneof![
        "[a-z ]{0,12}",
        any::<f32>().prop_map(|f| f.to_string()),
        Just("nan".to_string()),
        Just("1e400".to_string()),
        Just("\"a,b\"\"c\"".to_string()),
        Just("\"unterminated".to_string()),
        syntax_text(),
    ];
    let json_value = prop_oneof![
        "[a-z ]{0,12}".prop_map(|s| serde_json::Value::from(s)),
        any::<f64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        Just(serde_json::json!([1, "a"])),
        Just(serde_json::json!({"a": 1})),
        Just(serde_json::Value::from(true)),
    ];
    let header = proptest::collection::vec(role, 0..5);
    let rows = proptest::collection::vec(proptest::collection::vec(field, 0..5), 0..8);
    let json_rows =
        proptest::collection::vec(proptest::collection::vec(json_value, 0..5), 0..8);
    (header, rows, json_rows, 0..3usize).prop_map(|(header, rows, json_rows, kind)| match kind {
        0 | 1 => {
            let sep = if kind == 0 { "," } else { "\t" };
            let mut text = header.join(sep) + "\n";
            for r in rows {
                text.push_str(&r.join(sep));
                text.push('\n');
            }
            (text, if kind == 0 { "csv" } else { "tsv" })
        }
        _ => {
            let mut text = String::new();
            for r in json_rows {
                let obj: serde_json::Map<String, serde_json::Value> = header
                    .iter()
                    .map(|h| h.to_string())
                    .zip(r)
                    .collect();
                text.push_str(&serde_json::Value::Object(obj).to_string());
                text.push('\n');
            }
            (text, "jsonl")
        }
    })
}

fn read_all_ways(path: &Path) {
    let _ = read_dataset(path, None, None, None);
    let _ = read_dataset(path, None, None, Some(2));
    let _ = read_eval_file(path);
    let roles = BTreeMap::from([
        ("anchor".to_string(), "a".to_string()),
        ("positive".to_string(), "b".to_string()),
    ]);
    let _ = read_dataset(path, None, Some(&roles), None);
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn data_files_of_arbitrary_bytes_are_rows_or_a_typed_error(
        b in bytes(),
        ext in proptest::sample::select(vec!["csv", "tsv", "jsonl", "txt"]),
    ) {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join(format!("data.{ext}"));
        std::fs::write(&path, &b).unwrap();
        read_all_ways(&path);
        for format in [Format::Csv, Format::Tsv, Format::Jsonl] {
            let _ = read_dataset(&path, Some(format), None, None);
        }
        let _ = read_corpus(&path);
    }

    #[test]
    fn data_files_of_arbitrary_rows_are_rows_or_a_typed_error((text, ext) in data_text()) {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join(format!("data.{ext}"));
        std::fs::write(&path, &text).unwrap();
        read_all_ways(&path);
        let _ = read_corpus(&path);
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and run_state.json
// ---------------------------------------------------------------------------------------------

/// A real checkpoint of two small tensors, written once; each case damages a copy.
fn saved_checkpoint() -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let vars: BTreeMap<String, Var> = [("a.weight", 6usize), ("b.bias", 3)]
        .into_iter()
        .map(|(n, len)| {
            let t = Tensor::arange(0f32, len as f32, &Device::Cpu).unwrap();
            (n.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let mut opt = AdamW::new(0.01);
    let grads: Grads = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().ones_like().unwrap()))
        .collect();
    opt.step(&vars, &grads, 1.0, 1e-3, &mut Default::default(), || Ok(()))
        .unwrap();
    let progress = Progress {
        step: 1,
        scaler: LossScaler::new(Precision::F16),
        mem: MemState::new(4, 8, 100),
        best: Some(0.5),
        dev_before: None,
        nonfinite_streak: 0,
    };
    let cfg = Config::from_toml("[model]\npath = \"m\"\n[data]\ntrain = \"t.csv\"\n", "c", &[])
        .unwrap();
    let staged = checkpoint::stage(dir.path(), &progress, &cfg, &vars, &opt).unwrap();
    let path = staged.publish(2).unwrap();
    assert!(checkpoint::load(&path, None, &Device::Cpu).is_ok());
    (dir, path)
}

const FILES: [&str; 4] = [
    "manifest.json",
    "state.json",
    "weights.safetensors",
    "optimizer.safetensors",
];

/// How a file is damaged: replaced by arbitrary bytes, cut, or with bytes overwritten.
#[derive(Debug, Clone)]
enum Damage {
    Replace(Vec<u8>),
    Truncate(usize),
    Overwrite(usize, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        bytes().prop_map(Damage::Replace),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, b)| Damage::Overwrite(at, b)),
    ]
}

fn apply(original: &[u8], d: &Damage) -> Vec<u8> {
    match d {
        Damage::Replace(b) => b.clone(),
        Damage::Truncate(n) => original[..n % (original.len() + 1)].to_vec(),
        Damage::Overwrite(at, b) => {
            let mut out = original.to_vec();
            let at = at % (out.len() + 1);
            for (i, x) in b.iter().enumerate() {
                match out.get_mut(at + i) {
                    Some(y) => *y = *x,
                    None => out.push(*x),
                }
            }
            out
        }
    }
}

/// Rewrites the manifest's size and CRC of `name` to match the file, so the damage reaches the
/// file's own parser instead of stopping at the checksum.
fn reseal(dir: &Path, name: &str) {
    let manifest = dir.join("manifest.json");
    let Ok(mut m) = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&manifest).unwrap())
    else {
        return;
    };
    let bytes = std::fs::read(dir.join(name)).unwrap();
    m["files"][name] = serde_json::json!({
        "bytes": bytes.len(),
        "crc32": crc32fast::hash(&bytes),
    });
    std::fs::write(manifest, m.to_string()).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn a_damaged_checkpoint_is_loaded_or_refused_never_a_panic(
        which in 0..FILES.len(),
        d in damage(),
        resealed in any::<bool>(),
    ) {
        thread_local! {
            static SAVED: (TempDir, PathBuf) = saved_checkpoint();
        }
        SAVED.with(|(_, original)| {
            let work = TempDir::new().unwrap();
            let path = work.path().join("step-1");
            copy_dir(original, &path);
            let name = FILES[which];
            let bytes = std::fs::read(path.join(name)).unwrap();
            std::fs::write(path.join(name), apply(&bytes, &d)).unwrap();
            if resealed && name != "manifest.json" {
                reseal(&path, name);
            }
            let _ = checkpoint::load(&path, None, &Device::Cpu);
            let _ = checkpoint::describe_newest(work.path());
        });
    }

    #[test]
    fn state_json_of_arbitrary_json_is_loaded_or_refused(
        edits in proptest::collection::vec(
            (proptest::sample::select(vec![
                "format", "progress", "adam_step", "config", "step", "scaler", "mem", "best",
                "nonfinite_streak", "micro", "max_micro", "scale",
            ]), prop_oneof![
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                Just(serde_json::Value::Null),
                Just(serde_json::json!(u64::MAX)),
                Just(serde_json::json!({})),
                Just(serde_json::json!([])),
                "[a-z]{0,6}".prop_map(serde_json::Value::from),
            ]),
            1..4,
        ),
    ) {
        thread_local! {
            static SAVED: (TempDir, PathBuf) = saved_checkpoint();
        }
        SAVED.with(|(_, original)| {
            let work = TempDir::new().unwrap();
            let path = work.path().join("step-1");
            copy_dir(original, &path);
            let file = path.join("state.json");
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            for (k, value) in &edits {
                // At the top level, or inside progress and its memory state.
                let set = |target: &mut serde_json::Value| {
                    if let Some(slot) = target.get_mut(*k) {
                        *slot = value.clone();
                    }
                };
                set(&mut v);
                set(&mut v["progress"]);
                set(&mut v["progress"]["mem"]);
            }
            std::fs::write(&file, v.to_string()).unwrap();
            reseal(&path, "state.json");
            let _ = checkpoint::load(&path, None, &Device::Cpu);
        });
    }

    #[test]
    fn run_state_json_of_arbitrary_bytes_is_read_or_refused(
        b in prop_oneof![
            bytes(),
            (any::<i64>(), any::<i64>())
                .prop_map(|(a, b)| format!("{{\"micro\":{a},\"max_micro\":{b}}}").into_bytes()),
        ],
    ) {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join("run_state.json"), b).unwrap();
        if let Ok(Some(s)) = RunState::read(dir.path()) {
            prop_assert!(1 <= s.micro && s.micro <= s.max_micro);
        }
    }
}
