//! `st-tune mine` through the binary on the real all-MiniLM-L6-v2: the same negatives as
//! sentence-transformers' `mine_hard_negatives` for each option set of
//! tests/fixtures/mining-all-MiniLM-L6-v2.json (scripts/make_mining_fixture.py), in the same
//! order. Anchors the script marks as near ties (scores within 1e-4 where the choice is made)
//! are left out: there torch and candle rounding may pick either.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::Value;

fn st_tune(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_st-tune"))
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stderr).unwrap())
}

/// `st-tune mine` on the fixture pairs (with the fixture corpus when `corpus`), output read back.
fn mine(out: &Path, corpus: bool, extra: &[&str]) -> Vec<HashMap<String, String>> {
    let model = common::real_model("all-MiniLM-L6-v2");
    let pairs = common::fixture("retrieval-pairs.csv");
    let corpus_file = common::fixture("retrieval-corpus.txt");
    let mut args = vec![
        "mine",
        "--model",
        model.to_str().unwrap(),
        "--data",
        pairs.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    if corpus {
        args.extend(["--corpus", corpus_file.to_str().unwrap()]);
    }
    args.extend(extra);
    let (ok, err) = st_tune(&args);
    assert!(ok, "st-tune mine {extra:?} failed: {err}");
    read_rows(out)
}

/// The rows of a CSV or JSON lines output, keyed by column.
fn read_rows(path: &Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    if path.extension().unwrap() == "jsonl" {
        return text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    }
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    r.records()
        .map(|rec| {
            header
                .iter()
                .cloned()
                .zip(rec.unwrap().iter().map(String::from))
                .collect()
        })
        .collect()
}

/// Negatives per (anchor, positive), in file order, from triplet or n-tuple rows.
fn negatives_by_pair(rows: &[HashMap<String, String>]) -> Vec<((String, String), Vec<String>)> {
    let mut out: Vec<((String, String), Vec<String>)> = Vec::new();
    for row in rows {
        let key = (row["anchor"].clone(), row["positive"].clone());
        let negs: Vec<String> = match row.get("negative") {
            Some(n) => vec![n.clone()],
            None => (1..)
                .map_while(|i| row.get(&format!("negative_{i}")).cloned())
                .collect(),
        };
        match out.last_mut() {
            Some((k, v)) if *k == key => v.extend(negs),
            _ => out.push((key, negs)),
        }
    }
    out
}

#[test]
fn negatives_match_mine_hard_negatives_for_every_option_set() {
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("mining-all-MiniLM-L6-v2.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let args: Vec<&str> = case["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        // A folder that does not exist yet: mine makes it.
        let out = tmp.path().join(name).join("mined.csv");
        let got = negatives_by_pair(&mine(&out, case["corpus"].as_bool().unwrap(), &args));
        let got: HashMap<_, _> = got.into_iter().collect();
        let ties: HashSet<&str> = case["near_tie_anchors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let mut compared = 0;
        for want in case["rows"].as_array().unwrap() {
            let key = (
                want["anchor"].as_str().unwrap().to_string(),
                want["positive"].as_str().unwrap().to_string(),
            );
            if ties.contains(key.0.as_str()) {
                continue;
            }
            let want_negs: Vec<String> = want["negatives"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_string())
                .collect();
            let got_negs = got.get(&key).cloned().unwrap_or_default();
            assert_eq!(got_negs, want_negs, "{name}: anchor {:?}", key.0);
            compared += 1;
        }
        let all = case["rows"].as_array().unwrap().len();
        assert!(
            compared * 10 >= all * 9,
            "{name}: only {compared} of {all} compared"
        );
        // Nothing beyond the pairs Python wrote.
        let python_pairs = case["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| !r["negatives"].as_array().unwrap().is_empty());
        assert_eq!(got.len(), python_pairs.count(), "{name}: rows written");
    }
}

#[test]
fn random_sampling_is_seeded_and_stays_in_the_window_and_filters() {
    let tmp = tempfile::tempdir().unwrap();
    let window = [
        "--range-min",
        "2",
        "--range-max",
        "10",
        "--max-score",
        "0.5",
    ];
    let run = |seed: &str, file: &str| {
        let mut args = vec![
            "--sampling",
            "random",
            "--num-negatives",
            "3",
            "--seed",
            seed,
        ];
        args.extend(window);
        negatives_by_pair(&mine(&tmp.path().join(file), true, &args))
    };
    let a = run("1", "a.jsonl");
    assert_eq!(a, run("1", "b.jsonl"), "same seed, same negatives");
    assert_ne!(a, run("2", "c.jsonl"), "another seed, another choice");
    // Every random negative is among the top-sampled window of 8 (ranks 2..10 of the
    // candidates at most 0.5 similar).
    let top = {
        let mut args = vec!["--num-negatives", "8"];
        args.extend(window);
        negatives_by_pair(&mine(&tmp.path().join("top.csv"), true, &args))
    };
    let top: HashMap<_, _> = top.into_iter().collect();
    for (key, negs) in &a {
        let allowed: HashSet<&String> = top[key].iter().collect();
        assert!(negs.len() <= 3);
        assert!(
            negs.iter().all(|n| allowed.contains(n)),
            "{key:?}: {negs:?}"
        );
        // Kept in score order: the order of the window.
        let ranks: Vec<usize> = negs
            .iter()
            .map(|n| top[key].iter().position(|t| t == n).unwrap())
            .collect();
        assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{key:?}");
    }
}

#[test]
fn too_many_negatives_or_a_repeated_corpus_text_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::real_model("all-MiniLM-L6-v2");
    let pairs = common::fixture("retrieval-pairs.csv");
    let out = tmp.path().join("out.csv");
    let (ok, err) = st_tune(&[
        "mine",
        "--model",
        model.to_str().unwrap(),
        "--data",
        pairs.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--num-negatives",
        "60",
    ]);
    assert!(!ok);
    assert!(err.contains("cannot mine 60 negatives"), "{err}");
    assert!(err.contains("distinct texts"), "{err}");

    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, "one text\nanother\none text\n").unwrap();
    let (ok, err) = st_tune(&[
        "mine",
        "--model",
        model.to_str().unwrap(),
        "--data",
        pairs.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("corpus.txt:3") && err.contains("line 1"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written on an error");

    let (ok, err) = st_tune(&[
        "mine",
        "--model",
        model.to_str().unwrap(),
        "--data",
        pairs.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--prompt",
        "nosuch",
    ]);
    assert!(!ok);
    assert!(err.contains("no prompt named \"nosuch\""), "{err}");
}

#[test]
fn corpus_chunks_change_nothing() {
    use st_tune::train::mine::{mine_in_chunks, MineOptions, Sampling};
    let device = candle_core::Device::Cpu;
    let model = st_tune::model::SentenceModel::load(
        common::real_model("all-MiniLM-L6-v2").to_str().unwrap(),
        &device,
        None,
    )
    .unwrap();
    let pairs = st_tune::data::read::read_dataset(
        &common::fixture("retrieval-pairs.csv"),
        None,
        None,
        None,
    )
    .unwrap();
    let corpus =
        st_tune::data::read::read_corpus(&common::fixture("retrieval-corpus.txt")).unwrap();
    let o = MineOptions {
        num_negatives: 4,
        range_min: 1,
        relative_margin: Some(0.2),
        sampling: Sampling::Random,
        ..MineOptions::default()
    };
    let run = |chunk| {
        mine_in_chunks(&model, &device, &pairs, &corpus, &o, 16, chunk, &|_, _| {}).unwrap()
    };
    let whole = run(10_000);
    assert_eq!(whole.len(), 49, "one result per distinct anchor");
    for chunk in [1, 7, 50] {
        let got = run(chunk);
        assert_eq!(got.len(), whole.len());
        for (g, w) in got.iter().zip(&whole) {
            let texts = |m: &st_tune::train::mine::Mined| {
                m.negatives
                    .iter()
                    .map(|n| n.text.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(texts(g), texts(w), "chunk {chunk}: {}", w.anchor);
        }
    }
}
