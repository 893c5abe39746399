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
use st_tune::memory::policy::MemState;
use st_tune::sweep::spec::Sweep;
use st_tune::train::checkpoint::RunState;
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
        8 => proptest::sample::select(real),
        1 => "[a-z._]{0,16}",
    ]
}

/// Every key's default, as TOML, by `section.key` (keys unset by default are absent).
fn defaults() -> BTreeMap<String, toml::Value> {
    let text = toml::to_string(&Config::default()).unwrap();
    let root: toml::Table = text.parse().unwrap();
    let mut out = BTreeMap::new();
    for (section, table) in root {
        if let toml::Value::Table(t) = table {
            for (k, v) in t {
                out.insert(format!("{section}.{k}"), v);
            }
        }
    }
    out
}

/// Words the config takes as values: precisions, losses, levers, formats, sizes.
const WORDS: &[&str] = &[
    "f32",
    "f16",
    "bf16",
    "mnrl",
    "cosent",
    "cosine",
    "auto",
    "csv",
    "tsv",
    "jsonl",
    "cpu",
    "cuda",
    "cuda:1",
    "gradient_checkpointing",
    "max_seq_length",
    "6GiB",
    "80%",
    "0%",
    "512MiB",
    "spearman",
    "ndcg@10",
    "",
];

/// A value near what `key` takes (its default's type, sizes around it, the words it may
/// take) three times in four, any TOML value otherwise.
fn value_for(key: &str) -> BoxedStrategy<String> {
    prop_oneof![3 => near_value(key), 1 => toml_value()].boxed()
}

/// A value of the type `key` takes: its default's type, sizes around it, the config's words.
fn near_value(key: &str) -> BoxedStrategy<String> {
    match defaults().get(key) {
        Some(toml::Value::Integer(n)) => {
            let n = *n;
            prop_oneof![
                Just(n),
                0..16i64,
                Just(-1),
                Just(i64::MAX),
                Just(n.saturating_mul(1000))
            ]
            .prop_map(|n| n.to_string())
            .boxed()
        }
        Some(toml::Value::Float(f)) => {
            let f = *f;
            prop_oneof![
                Just(f),
                Just(0.0),
                Just(-f),
                Just(f * 1e6),
                Just(1e-12),
                Just(f64::MAX),
                any::<f64>()
            ]
            .prop_map(|f| format!("{f:?}").replace("NaN", "nan"))
            .boxed()
        }
        Some(toml::Value::Boolean(_)) => any::<bool>().prop_map(|b| b.to_string()).boxed(),
        Some(toml::Value::Array(_)) => prop_oneof![
            Just("[]".to_string()),
            proptest::collection::vec(proptest::sample::select(WORDS), 0..4)
                .prop_map(|w| format!("{w:?}")),
            proptest::collection::vec(0..600i64, 0..5).prop_map(|v| format!("{v:?}")),
        ]
        .boxed(),
        _ => prop_oneof![
            proptest::sample::select(WORDS).prop_map(|w| format!("{w:?}")),
            (0..600i64).prop_map(|n| n.to_string()),
            proptest::collection::vec(0..600i64, 1..5).prop_map(|v| format!("{v:?}")),
        ]
        .boxed(),
    }
}

/// A key and a value for it.
fn entry() -> impl Strategy<Value = (String, String)> {
    key().prop_flat_map(|k| {
        let v = value_for(&k);
        (Just(k), v)
    })
}

/// A config document: the two required keys, then keys with values near what they take.
fn config_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(entry(), 0..6).prop_map(|entries| {
        let mut by_section: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let base = [("model", "path", "\"m\""), ("data", "train", "\"t.csv\"")];
        for (section, k, v) in base {
            by_section
                .entry(section.into())
                .or_default()
                .insert(k.into(), v.into());
        }
        for (k, v) in entries {
            let (s, k) = k.split_once('.').unwrap_or(("train", k.as_str()));
            by_section
                .entry(s.to_string())
                .or_default()
                .insert(k.to_string(), v);
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
                entry().prop_map(|(k, v)| format!("{k}={v}")),
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
    let sweep_entry = prop_oneof![
        Just(("method", "\"grid\"".to_string())),
        Just(("method", "\"random\"".to_string())),
        Just(("method", "\"tpe\"".to_string())),
        Just(("metric", "\"dev.spearman\"".to_string())),
        Just(("metric", "\"train.loss\"".to_string())),
        Just(("goal", "\"min\"".to_string())),
        Just(("dir", "\"out\"".to_string())),
        (0..20u64).prop_map(|n| ("trials", n.to_string())),
        Just(("trials", i64::MAX.to_string())),
        (0..1_000_000_000u64).prop_map(|n| ("seed", n.to_string())),
    ];
    let odd_sweep_entry = proptest::sample::select(vec![
        "base", "dir", "method", "trials", "seed", "metric", "goal", "other",
    ])
    .prop_flat_map(|k| (Just(k), toml_value()));
    let sweep_entry = prop_oneof![8 => sweep_entry, 1 => odd_sweep_entry];
    // Output keys are the sweep's own (refused in [space]); mostly the others.
    let space_key = prop_oneof![
        6 => key().prop_filter("an output key", |k| !k.starts_with("output.")),
        1 => key(),
    ];
    let space_entry = space_key.prop_flat_map(|k| {
        let v = prop_oneof![6 => near_value(&k), 1 => toml_value()];
        let values = prop_oneof![
            3 => proptest::collection::vec(v, 1..4).prop_map(|v| format!("[{}]", v.join(", "))),
            1 => Just("[]".to_string()),
            1 => (any::<f64>(), any::<f64>())
                .prop_map(|(a, b)| format!("{{ uniform = [{a:?}, {b:?}] }}")),
            1 => (1e-9..1.0f64, 1e-9..1.0f64)
                .prop_map(|(a, b)| format!("{{ log_uniform = [{a:?}, {b:?}] }}")),
            1 => (any::<i64>(), any::<i64>())
                .prop_map(|(a, b)| format!("{{ int_uniform = [{a}, {b}] }}")),
            1 => (0..4i64, 0..64i64)
                .prop_map(|(a, b)| format!("{{ int_uniform = [{a}, {b}] }}")),
            1 => toml_value(),
        ];
        (Just(k), values)
    });
    let prune_entry = prop_oneof![
        3 => proptest::sample::select(vec!["none", "median", "asha", "x"])
            .prop_map(|m| ("method", format!("{m:?}"))),
        2 => (proptest::sample::select(vec!["min_rows", "reduction", "min_trials"]), -2..40i64)
            .prop_map(|(k, n)| (k, n.to_string())),
        1 => proptest::sample::select(vec!["min_rows", "reduction", "min_trials", "other"])
            .prop_flat_map(|k| (Just(k), toml_value())),
    ];
    (
        proptest::collection::vec(sweep_entry, 0..6),
        prop_oneof![
            6 => proptest::collection::vec(space_entry.clone(), 1..4),
            1 => proptest::collection::vec(space_entry, 0..4),
        ],
        prop_oneof![
            3 => Just(Vec::new()),
            1 => proptest::collection::vec(prune_entry, 0..3).prop_map(|mut v| {
                v.insert(0, ("method", "\"asha\"".to_string()));
                v
            }),
        ],
        prop_oneof![9 => Just(true), 1 => Just(false)],
    )
        .prop_map(|(sweep, space, prune, with_base)| {
            let mut text = String::from("[sweep]\n");
            if with_base {
                text.push_str("base = \"base.toml\"\n");
            }
            let mut seen = std::collections::BTreeSet::from(["base"]);
            for (k, v) in sweep {
                if (!with_base || k != "base") && seen.insert(k) {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
            text.push_str("[space]\n");
            let mut seen = std::collections::BTreeSet::new();
            for (k, v) in space {
                if seen.insert(k.clone()) {
                    text.push_str(&format!("{k:?} = {v}\n"));
                }
            }
            if !prune.is_empty() {
                text.push_str("[prune]\n");
            }
            let mut seen = std::collections::BTreeSet::new();
            for (k, v) in prune {
                if seen.insert(k) {
                    text.push_str(&format!("{k} = {v}\n"));
                }
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

/// Found by the long campaign: the span of an integer range as wide as an i64 overflowed.
#[test]
fn an_integer_range_as_wide_as_an_i64_draws_within_its_bounds() {
    let dir = sweep_folder();
    let file = dir.path().join("sweep.toml");
    std::fs::write(
        &file,
        "[sweep]\nbase = \"base.toml\"\nmethod = \"random\"\ntrials = 8\n[space]\n\
         \"train.seed\" = { int_uniform = [0, 9223372036854775807] }\n",
    )
    .unwrap();
    let sweep = Sweep::load(&file).unwrap();
    for i in 0..8 {
        let params = st_tune::sweep::trials::params(&sweep, i).unwrap();
        let seed = params[0].1.as_integer().unwrap();
        assert!(seed >= 0, "{params:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Data files
// ---------------------------------------------------------------------------------------------

/// A CSV, TSV or JSON lines document: a header of role names (a layout st-tune takes most of
/// the time) and rows of fields, mostly as many as the header, mostly plain.
fn data_text() -> impl Strategy<Value = (String, &'static str)> {
    let role = proptest::sample::select(vec![
        "anchor",
        "positive",
        "negative",
        "sentence1",
        "sentence2",
        "score",
        "label",
        "query",
        "",
        "x",
    ]);
    let header = prop_oneof![
        3 => proptest::sample::select(vec![
            vec!["anchor", "positive"],
            vec!["anchor", "positive", "negative"],
            vec!["sentence1", "sentence2", "score"],
            vec!["sentence1", "sentence2", "label"],
        ]),
        1 => proptest::collection::vec(role, 0..5),
    ];
    // Each cell: a text, a number, and something odd; the column's role picks which.
    let odd = prop_oneof![
        any::<f32>().prop_map(|f| f.to_string()),
        Just("nan".to_string()),
        Just("".to_string()),
        Just("\"a,b\"\"c\"".to_string()),
        Just("\"unterminated".to_string()),
        syntax_text(),
    ];
    let cell = (
        "[a-z]{1,8}( [a-z]{1,8}){0,3}",
        (0.0..1.0f32).prop_map(|f| f.to_string()),
        odd,
        0..10u8,
    );
    let json_odd = prop_oneof![
        any::<f64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        Just(serde_json::json!([1, "a"])),
        Just(serde_json::json!({"a": 1})),
        Just(serde_json::Value::from(true)),
        Just(serde_json::Value::from("")),
    ];
    let json_cell = (
        "[a-z]{1,8}( [a-z]{1,8}){0,3}",
        0.0..1.0f64,
        json_odd,
        0..10u8,
    );
    let rows = proptest::collection::vec(
        (
            proptest::collection::vec(cell, 0..6),
            proptest::bool::weighted(0.2),
        ),
        0..8,
    );
    let json_rows = proptest::collection::vec(
        (
            proptest::collection::vec(json_cell, 0..6),
            proptest::bool::weighted(0.2),
        ),
        0..8,
    );
    fn numeric(role: &str) -> bool {
        role == "score" || role == "label"
    }
    (header, rows, json_rows, 0..3usize).prop_map(|(header, rows, json_rows, kind)| {
        // Most rows as wide as the header; the flag keeps a row as generated.
        fn fit<T: Clone>(mut r: Vec<T>, keep: bool, width: usize, pad: T) -> Vec<T> {
            if !keep || r.len() > 5 {
                r.resize(width, pad);
            }
            r
        }
        match kind {
            0 | 1 => {
                let sep = if kind == 0 { "," } else { "\t" };
                let mut text = header.join(sep) + "\n";
                for (r, keep) in rows {
                    let r: Vec<String> = r
                        .into_iter()
                        .enumerate()
                        .map(|(i, (text, number, odd, pick))| match pick {
                            0 => odd,
                            _ if header.get(i).is_some_and(|h| numeric(h)) => number,
                            _ => text,
                        })
                        .collect();
                    text.push_str(&fit(r, keep, header.len(), "0.5".to_string()).join(sep));
                    text.push('\n');
                }
                (text, if kind == 0 { "csv" } else { "tsv" })
            }
            _ => {
                let mut text = String::new();
                for (r, keep) in json_rows {
                    let r: Vec<serde_json::Value> = r
                        .into_iter()
                        .enumerate()
                        .map(|(i, (text, number, odd, pick))| match pick {
                            0 => odd,
                            _ if header.get(i).is_some_and(|h| numeric(h)) => number.into(),
                            _ => text.into(),
                        })
                        .collect();
                    let r = fit(r, keep, header.len(), serde_json::Value::from(0.5));
                    let obj: serde_json::Map<String, serde_json::Value> =
                        header.iter().map(|h| h.to_string()).zip(r).collect();
                    text.push_str(&serde_json::Value::Object(obj).to_string());
                    text.push('\n');
                }
                (text, "jsonl")
            }
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
        .map(|(n, v)| (n.clone(), v.as_tensor().ones_like().unwrap().into()))
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
    let cfg = Config::from_toml(
        "[model]\npath = \"m\"\n[data]\ntrain = \"t.csv\"\n",
        "c",
        &[],
    )
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
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
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
                if let Some(p) = v.get_mut("progress") {
                    set(p);
                    if let Some(m) = p.get_mut("mem") {
                        set(m);
                    }
                }
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

#[test]
fn an_mpnet_config_with_too_few_positions_is_refused_naming_the_file() {
    let dir = TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "mpnet", "vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 1}"#,
    )
    .unwrap();
    let e = st_tune::model::folder::FolderSpec::read(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("max_position_embeddings is 1"),
        "{e}"
    );
}
