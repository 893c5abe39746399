//! Parquet files as Hugging Face `datasets` writes them (fixtures from
//! scripts/make_parquet_fixture.py: snappy and zstd pages, several row groups, string, integer
//! and list-of-float columns) read into the same rows as Python reads back, and a bad value is
//! named by file, row group and row.

mod common;

use serde_json::Value;
use st_tune::data::read::{read_corpus, read_dataset, Format};
use st_tune::data::RowShape;
use st_tune::error::Error;

fn expected(file: &str) -> Value {
    let text = std::fs::read_to_string(common::fixture("parquet-expected.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()[file].clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn snappy_string_columns_read_as_pairs() {
    let d = read_dataset(&common::fixture("parquet-pairs.parquet"), None, None, None).unwrap();
    assert_eq!(d.shape, RowShape::Pair);
    let want = expected("parquet-pairs.parquet");
    let anchors: Vec<String> = d.rows.iter().map(|r| r.texts[0].clone()).collect();
    let positives: Vec<String> = d.rows.iter().map(|r| r.texts[1].clone()).collect();
    assert_eq!(anchors, strings(&want["anchor"]));
    assert_eq!(positives, strings(&want["positive"]));
    assert_eq!(d.rows[4].line, 5, "rows count from 1 through the file");
}

#[test]
fn row_groups_and_integer_labels_read_as_labelled_pairs() {
    let d = read_dataset(
        &common::fixture("parquet-labelled.parquet"),
        None,
        None,
        None,
    )
    .unwrap();
    assert_eq!(d.shape, RowShape::Labeled);
    let want = expected("parquet-labelled.parquet");
    assert_eq!(d.len(), 7, "three row groups, every row");
    let labels: Vec<f64> = d.rows.iter().map(|r| r.score.unwrap() as f64).collect();
    let want_labels: Vec<f64> = want["label"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(labels, want_labels);
    let second: Vec<String> = d.rows.iter().map(|r| r.texts[1].clone()).collect();
    assert_eq!(second, strings(&want["sentence2"]));
    // data.limit stops inside a row group.
    let d = read_dataset(
        &common::fixture("parquet-labelled.parquet"),
        None,
        None,
        Some(4),
    )
    .unwrap();
    assert_eq!(d.len(), 4);
}

#[test]
fn zstd_list_columns_read_as_teacher_embeddings() {
    let d = read_dataset(
        &common::fixture("parquet-distill.parquet"),
        None,
        None,
        None,
    )
    .unwrap();
    assert_eq!(d.shape, RowShape::Distill);
    let want = expected("parquet-distill.parquet");
    for (row, w) in d.rows.iter().zip(want["embedding"].as_array().unwrap()) {
        let w: Vec<f32> = w
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(row.teacher.as_ref().unwrap(), &w);
    }
    assert_eq!(d.rows[2].texts, ["three"]);
}

#[test]
fn a_bad_label_names_the_file_the_row_group_and_the_row() {
    let e = read_dataset(
        &common::fixture("parquet-bad-label.parquet"),
        None,
        None,
        None,
    )
    .unwrap_err();
    let shown = e.to_string();
    assert!(matches!(e, Error::Data { .. }), "{e:?}");
    assert!(shown.contains("parquet-bad-label.parquet: "), "{shown}");
    assert!(
        shown.contains(
            "row group 1, row 2 (counting from 0): label 2 in column `label` must be 0 or 1"
        ),
        "{shown}"
    );
}

#[test]
fn data_format_parquet_reads_any_extension_and_a_text_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.bin");
    std::fs::copy(common::fixture("parquet-pairs.parquet"), &path).unwrap();
    let d = read_dataset(&path, Some(Format::Parquet), None, None).unwrap();
    assert_eq!(d.len(), 5);
    let text = dir.path().join("t.parquet");
    std::fs::write(&text, "anchor,positive\na,b\n").unwrap();
    let shown = read_dataset(&text, None, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        shown.contains("t.parquet: not a readable Parquet file"),
        "{shown}"
    );
}

#[test]
fn a_corpus_is_the_text_column_and_a_file_without_one_is_named() {
    let texts = read_corpus(&common::fixture("parquet-corpus.parquet")).unwrap();
    assert_eq!(texts, strings(&expected("parquet-corpus.parquet")["text"]));
    let shown = read_corpus(&common::fixture("parquet-pairs.parquet"))
        .unwrap_err()
        .to_string();
    assert!(
        shown.contains(
            "parquet-pairs.parquet: a corpus file needs a `text` column; it has: anchor, positive"
        ),
        "{shown}"
    );
}
