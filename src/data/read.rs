//! Reads a data file (CSV, TSV, JSON lines or Parquet, see `read/parquet.rs`) into a checked
//! [`Dataset`].
//!
//! The row shape comes from the column roles: either `data.columns` (role → column name) or,
//! without it, the header's own names (`anchor,positive[,negative[,margin]]`,
//! `sentence1,sentence2,score`, `sentence1,sentence2,label` or `text,embedding`); never from
//! column order. An `embedding` is a JSON list of numbers: a list in JSON lines (as
//! `st-tune encode` writes it), the list's text in a CSV or TSV cell. Every problem is reported as
//! `file:line: what is wrong`, with `line` the 1-based line a user sees in an editor, so a bad
//! row is found before a model is loaded rather than halfway through an epoch.
//!
//! This module does not tokenize, shuffle or batch (see `tokenize` and `batch`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Dataset, Row, RowShape};
use crate::error::{Error, Result};

mod parquet;

/// File format of a data file (`data.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Comma-separated, RFC 4180 quoting, header line first.
    Csv,
    /// Tab-separated, no quoting (a text cannot hold a tab or a newline), header line first.
    Tsv,
    /// One JSON object per line; its keys are the column names.
    Jsonl,
    /// Apache Parquet (as Hugging Face `datasets` writes it); its columns are the column names.
    Parquet,
}

impl Format {
    /// The format an extension implies: .csv, .tsv/.tab, .jsonl/.ndjson/.json, .parquet
    /// (case-insensitive).
    /// `.json` counts as JSON lines because that is what `datasets`' `to_json` writes.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "tsv" | "tab" => Some(Format::Tsv),
            "jsonl" | "ndjson" | "json" => Some(Format::Jsonl),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every role `data.columns` may map.
pub const ROLES: &[&str] = &[
    "anchor",
    "positive",
    "negative",
    "margin",
    "sentence1",
    "sentence2",
    "score",
    "label",
    "text",
    "embedding",
];

/// How the shapes' columns are named, for messages.
const LAYOUTS: &str = "anchor,positive[,negative[,margin] or ,negative_1,negative_2,...], \
                       sentence1,sentence2,score, \
                       sentence1,sentence2,label or text,embedding";

/// The row shape the roles of `data.columns` describe: exactly the roles of one shape, the
/// negatives of an n-tuple as `negative_1`..`negative_n`.
pub fn shape_from_roles(columns: &BTreeMap<String, String>) -> Result<RowShape> {
    if let Some(role) = columns
        .keys()
        .find(|r| !ROLES.contains(&r.as_str()) && !is_numbered_negative(r))
    {
        return Err(Error::config(
            format!("data.columns.{role}"),
            format!(
                "unknown role; valid roles: {}, negative_1, negative_2, ...",
                ROLES.join(", ")
            ),
        ));
    }
    let keys: Vec<&str> = columns.keys().map(String::as_str).collect();
    let negatives = negative_columns(&keys).map_err(|e| Error::config("data.columns", e))?;
    RowShape::ALL
        .into_iter()
        .map(|shape| match shape {
            RowShape::Negatives(_) => RowShape::Negatives(negatives.len().max(1)),
            other => other,
        })
        .find(|shape| {
            let roles = mapped_roles(*shape, columns);
            roles.len() == columns.len() && roles.iter().all(|r| columns.contains_key(r))
        })
        .ok_or_else(|| {
            Error::config(
                "data.columns",
                format!(
                    "roles {} do not make a row; map anchor + positive (+ negative (+ margin), \
                     or + negative_1, negative_2, ...), sentence1 + sentence2 + score or label, \
                     or text + embedding",
                    keys.join(", ")
                ),
            )
        })
}

/// The `data.columns` keys of `shape`'s roles: its roles, but a lone negative may be mapped
/// as `negative_1`.
fn mapped_roles(shape: RowShape, columns: &BTreeMap<String, String>) -> Vec<String> {
    let mut roles = shape.roles();
    if shape == RowShape::TRIPLET && columns.contains_key("negative_1") {
        roles[2] = "negative_1".into();
    }
    roles
}

/// `negative_1`, `negative_2`, ...: an n-tuple file's negatives.
fn is_numbered_negative(name: &str) -> bool {
    name.strip_prefix("negative_")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The negative columns among `names`, in order: none, `negative`, or `negative_1` ..
/// `negative_n` with none missing. The error says what is wrong with them.
fn negative_columns(names: &[&str]) -> std::result::Result<Vec<String>, String> {
    let mut numbered: Vec<usize> = names
        .iter()
        .filter(|n| is_numbered_negative(n))
        .map(|n| n["negative_".len()..].parse().unwrap_or(usize::MAX))
        .collect();
    numbered.sort_unstable();
    let plain = names.contains(&"negative");
    if numbered.is_empty() {
        return Ok(if plain {
            vec!["negative".into()]
        } else {
            Vec::new()
        });
    }
    if plain {
        return Err(format!(
            "has both `negative` and `negative_{}`; name the negatives negative_1, \
             negative_2, ... (an n-tuple) or keep one named `negative` (a triplet)",
            numbered[0]
        ));
    }
    if let Some(missing) = (1..=numbered.len()).find(|i| numbered.binary_search(i).is_err()) {
        let listed: Vec<String> = numbered.iter().map(|i| format!("negative_{i}")).collect();
        return Err(format!(
            "has {} but no `negative_{missing}`; number the negatives \
             negative_1, negative_2, ... without a gap",
            listed.join(", ")
        ));
    }
    Ok((1..=numbered.len())
        .map(|i| format!("negative_{i}"))
        .collect())
}

/// Reads and checks a whole data file. `format` `None` picks it from the extension; `columns`
/// `None` takes the role names from the header; `limit` stops after that many rows.
pub fn read_dataset(
    path: &Path,
    format: Option<Format>,
    columns: Option<&BTreeMap<String, String>>,
    limit: Option<usize>,
) -> Result<Dataset> {
    read(path, format, columns, limit, false)
}

/// Reads a file for `st-tune eval`, which takes the roles from the header only: a header that
/// fits no evaluation is told the column names each evaluation needs (not `data.columns`).
pub fn read_eval_file(path: &Path) -> Result<Dataset> {
    read(path, None, None, None, true)
}

fn read(
    path: &Path,
    format: Option<Format>,
    columns: Option<&BTreeMap<String, String>>,
    limit: Option<usize>,
    eval: bool,
) -> Result<Dataset> {
    let format =
        match format.or_else(|| Format::from_path(path)) {
            Some(f) => f,
            None if eval => return Err(Error::data(
                path,
                0,
                "cannot tell the format from the extension; name the file .csv, .tsv, .jsonl or \
                 .parquet",
            )),
            None => {
                return Err(Error::config(
                    "data.format",
                    format!(
                        "cannot tell the format of {} from its extension; \
                     set data.format to \"csv\", \"tsv\", \"jsonl\" or \"parquet\"",
                        path.display()
                    ),
                ))
            }
        };
    if limit == Some(0) {
        return Err(Error::config(
            "data.limit",
            "must be at least 1; remove the key to read every row",
        ));
    }
    let reader = Reader {
        path,
        columns,
        limit: limit.unwrap_or(usize::MAX),
        eval,
    };
    let (shape, rows) = match format {
        Format::Parquet => reader.parquet()?,
        Format::Csv | Format::Tsv | Format::Jsonl => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            // Spreadsheet programs start UTF-8 files with a byte-order mark; it is not part of
            // the first column's name. It holds no newline, so line numbers are unaffected.
            let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            match format {
                Format::Jsonl => reader.json_lines(bytes)?,
                _ => reader.delimited(bytes, format)?,
            }
        }
    };
    check_widths(path, &rows)?;
    Ok(Dataset {
        path: path.to_path_buf(),
        shape,
        rows,
        distractors: Vec::new(),
        prompts: vec![None; shape.text_columns()],
    })
}

/// Which column of the file holds each role of `shape` (in `shape.roles()` order).
struct Layout {
    shape: RowShape,
    columns: Vec<String>,
    /// Whether the names came from `data.columns` (errors then name the mapping too).
    mapped: bool,
}

impl Layout {
    /// "column `answer` (data.columns.positive)" or "column `positive`".
    fn describe(&self, i: usize) -> String {
        let role = &self.shape.roles()[i];
        if self.mapped {
            format!("column `{}` (data.columns.{role})", self.columns[i])
        } else {
            format!("column `{}`", self.columns[i])
        }
    }
}

struct Reader<'a> {
    path: &'a Path,
    columns: Option<&'a BTreeMap<String, String>>,
    limit: usize,
    /// For `st-tune eval`: header errors name the evaluations instead of `data.columns`.
    eval: bool,
}

impl Reader<'_> {
    fn err(&self, line: usize, msg: impl Into<String>) -> Error {
        Error::data(self.path, line, msg)
    }

    /// Picks the shape and the column of each role from the names the file offers (its header,
    /// or the keys of its first JSON object). `what` says which, for messages.
    fn layout(&self, names: &[String], line: usize, what: &str) -> Result<Layout> {
        let has = |n: &str| names.iter().any(|h| h == n);
        let listed = || {
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(columns) = self.columns {
            let shape = shape_from_roles(columns)?;
            let mut picked = Vec::new();
            for role in mapped_roles(shape, columns) {
                let name = &columns[&role];
                if !has(name) {
                    return Err(self.err(
                        line,
                        format!(
                            "column `{name}` (data.columns.{role}) is not in the {what}; \
                             it has: {}",
                            listed()
                        ),
                    ));
                }
                if names.iter().filter(|h| *h == name).count() > 1 {
                    return Err(self.err(
                        line,
                        format!("column `{name}` appears more than once in the {what}"),
                    ));
                }
                picked.push(name.clone());
            }
            return Ok(Layout {
                shape,
                columns: picked,
                mapped: true,
            });
        }
        // Each family of shapes is told apart by its text columns; within one, the label
        // columns pick the shape (a score wins over a 0/1 label).
        let retrieval = has("anchor") && has("positive");
        let pairs = has("sentence1") && has("sentence2") && (has("score") || has("label"));
        let distill = has("text") && has("embedding");
        let families = [retrieval, pairs, distill].iter().filter(|f| **f).count();
        if families > 1 {
            return Err(self.err(
                line,
                if self.eval {
                    format!(
                        "the {what} has the columns of more than one kind of row ({LAYOUTS}), \
                         so it fits more than one evaluation; keep the columns of one"
                    )
                } else {
                    format!(
                        "the {what} has the columns of more than one kind of row ({LAYOUTS}); \
                         choose with data.columns, e.g. \
                         --set data.columns.anchor=anchor --set data.columns.positive=positive"
                    )
                },
            ));
        }
        if families == 0 {
            if self.eval {
                return Err(self.err(
                    line,
                    format!(
                        "the {what} ({}) fits no evaluation; name the columns \
                         sentence1,sentence2,score (similarity: Spearman and Pearson), \
                         sentence1,sentence2,label (binary classification: accuracy, F1, AP) or \
                         anchor,positive[,negative] (retrieval: NDCG@10, MRR@10, ...; with a \
                         negative also triplet accuracy)",
                        listed()
                    ),
                ));
            }
            let example = match names {
                [a, b, ..] => {
                    format!(", e.g. --set data.columns.anchor={a} --set data.columns.positive={b}")
                }
                _ => String::new(),
            };
            return Err(self.err(
                line,
                format!(
                    "cannot tell the row shape from the {what} ({}); name the columns \
                     {LAYOUTS}, or map yours with data.columns{example}",
                    listed()
                ),
            ));
        }
        let mut negatives = Vec::new();
        if retrieval {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            negatives =
                negative_columns(&names).map_err(|e| self.err(line, format!("the {what} {e}")))?;
            if has("margin") && !negatives.is_empty() && negatives[0] != "negative" {
                return Err(self.err(
                    line,
                    format!(
                        "the {what} has a `margin` column and {} negatives; a margin row \
                         (MarginMSELoss) takes one column named `negative`",
                        negatives.len()
                    ),
                ));
            }
        }
        let shape = if retrieval {
            match (negatives.len(), has("margin")) {
                (0, _) => RowShape::Pair,
                (_, true) => RowShape::Margin,
                (n, _) => RowShape::Negatives(n),
            }
        } else if pairs {
            if has("score") {
                RowShape::Scored
            } else {
                RowShape::Labeled
            }
        } else {
            RowShape::Distill
        };
        let columns = match shape {
            // `negative_1` alone (mine's n-tuple with one negative) is a triplet's negative.
            RowShape::Negatives(_) => [
                &["anchor".to_string(), "positive".to_string()],
                &negatives[..],
            ]
            .concat(),
            _ => shape.roles(),
        };
        Ok(Layout {
            shape,
            columns,
            mapped: false,
        })
    }

    /// Builds a row from the value of each role (`None`: missing), checking texts and labels.
    fn row(&self, layout: &Layout, line: usize, values: Vec<Field>) -> Result<Row> {
        let n_texts = layout.shape.text_columns();
        let mut texts = Vec::with_capacity(n_texts);
        let (mut score, mut teacher) = (None, None);
        for (i, value) in values.into_iter().enumerate() {
            if i < n_texts {
                let text = match value {
                    Field::Text(t) => t,
                    Field::Other(v) => {
                        return Err(self.err(
                            line,
                            format!("{} must be a string, found {v}", layout.describe(i)),
                        ))
                    }
                };
                if text.trim().is_empty() {
                    return Err(self.err(line, format!("{} is empty", layout.describe(i))));
                }
                texts.push(text);
            } else if layout.shape == RowShape::Distill {
                teacher = Some(self.embedding(layout, i, line, value)?);
            } else {
                let s = self.score(layout, i, line, value)?;
                if layout.shape == RowShape::Labeled && s != 0.0 && s != 1.0 {
                    return Err(self.err(
                        line,
                        format!("label {s} in {} must be 0 or 1", layout.describe(i)),
                    ));
                }
                score = Some(s);
            }
        }
        Ok(Row {
            texts,
            score,
            teacher,
            line,
        })
    }

    /// A teacher embedding: a JSON list of finite numbers (its text, in CSV and TSV).
    fn embedding(&self, layout: &Layout, i: usize, line: usize, value: Field) -> Result<Vec<f32>> {
        let json = match value {
            Field::Text(t) => serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)),
            Field::Other(v) => v,
        };
        let bad = |shown: &serde_json::Value| {
            let mut shown = shown.to_string();
            if shown.len() > 40 {
                shown = format!("{}…", shown.chars().take(40).collect::<String>());
            }
            self.err(
                line,
                format!(
                    "{} must be a JSON list of numbers (a teacher's embedding), found {shown}",
                    layout.describe(i)
                ),
            )
        };
        let serde_json::Value::Array(items) = &json else {
            return Err(bad(&json));
        };
        let v: Vec<f32> = items
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32).filter(|f| f.is_finite()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(&json))?;
        if v.is_empty() {
            return Err(self.err(line, format!("{} is an empty list", layout.describe(i))));
        }
        Ok(v)
    }

    fn score(&self, layout: &Layout, i: usize, line: usize, value: Field) -> Result<f32> {
        let (shown, parsed) = match &value {
            Field::Text(t) => (format!("`{t}`"), t.trim().parse::<f32>().ok()),
            Field::Other(serde_json::Value::Number(n)) => {
                (n.to_string(), n.as_f64().map(|f| f as f32))
            }
            Field::Other(v) => (v.to_string(), None),
        };
        match parsed {
            Some(s) if s.is_finite() => Ok(s),
            Some(_) => Err(self.err(
                line,
                format!(
                    "score {shown} in {} is not a finite number",
                    layout.describe(i)
                ),
            )),
            None => Err(self.err(
                line,
                format!("score {shown} in {} is not a number", layout.describe(i)),
            )),
        }
    }

    /// CSV and TSV through the csv crate. Its records carry the line where they start; blank
    /// lines, which it skips silently, are found from the bytes between records.
    fn delimited(&self, bytes: &[u8], format: Format) -> Result<(RowShape, Vec<Row>)> {
        let lines = LineIndex::new(bytes);
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(if format == Format::Tsv { b'\t' } else { b',' })
            .quoting(format == Format::Csv)
            .has_headers(false)
            // Rows of the wrong length are reported by us, with the counts.
            .flexible(true)
            .from_reader(bytes);
        let csv_err = |e: csv::Error| {
            let line = e.position().map_or(0, |p| lines.line_of(p.byte() as usize));
            self.err(line, e.to_string())
        };

        let mut record = csv::ByteRecord::new();
        if !rdr.read_byte_record(&mut record).map_err(csv_err)? {
            return Err(self.err(
                0,
                "file is empty; expected a header line such as `anchor,positive` and rows",
            ));
        }
        let (header_line, blank) = lines.record_start(bytes, &record);
        if let Some(blank) = blank {
            return Err(self.err(blank, "line is empty; the header must be the first line"));
        }
        let header = self.utf8_fields(&record, header_line)?;
        let layout = self.layout(&header, header_line, "header")?;
        let indices: Vec<usize> = layout
            .columns
            .iter()
            .map(|c| header.iter().position(|h| h == c).unwrap_or(0))
            .collect();

        let mut rows = Vec::new();
        while rows.len() < self.limit && rdr.read_byte_record(&mut record).map_err(csv_err)? {
            let (line, blank) = lines.record_start(bytes, &record);
            if let Some(blank) = blank {
                return Err(self.err(
                    blank,
                    "line is empty; remove it (a row must hold every column)",
                ));
            }
            let fields = self.utf8_fields(&record, line)?;
            if fields.len() == 1 && fields[0].trim().is_empty() && header.len() > 1 {
                return Err(self.err(line, "line is blank; remove it"));
            }
            if fields.len() != header.len() {
                let hint = match (format, fields.len() > header.len()) {
                    (Format::Csv, true) => "; a text holding a comma must be in double quotes",
                    (Format::Tsv, true) => "; a text cannot hold a tab in TSV",
                    _ => "",
                };
                return Err(self.err(
                    line,
                    format!(
                        "expected {} columns (as in the header), found {}{hint}",
                        header.len(),
                        fields.len()
                    ),
                ));
            }
            let values = indices
                .iter()
                .map(|&i| Field::Text(fields[i].clone()))
                .collect();
            rows.push(self.row(&layout, line, values)?);
        }
        if rows.is_empty() {
            return Err(self.err(header_line, "the header is not followed by any rows"));
        }
        Ok((layout.shape, rows))
    }

    fn utf8_fields(&self, record: &csv::ByteRecord, line: usize) -> Result<Vec<String>> {
        record
            .iter()
            .map(|f| {
                std::str::from_utf8(f)
                    .map(str::to_string)
                    .map_err(|_| self.err(line, "line is not valid UTF-8"))
            })
            .collect()
    }

    /// JSON lines: one object per line. The first object's keys pick the shape; every later
    /// object must have the same role keys. Blank lines at the very end are tolerated.
    fn json_lines(&self, bytes: &[u8]) -> Result<(RowShape, Vec<Row>)> {
        let mut raw_lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        while raw_lines.last().is_some_and(|l| l.trim_ascii().is_empty()) {
            raw_lines.pop();
        }
        if raw_lines.is_empty() {
            return Err(self.err(
                0,
                "file is empty; expected one JSON object per line, e.g. \
                 {\"anchor\": \"…\", \"positive\": \"…\"}",
            ));
        }
        let first = self.json_line(raw_lines[0], 1)?;
        let keys: Vec<String> = first.keys().cloned().collect();
        let layout = self.layout(&keys, 1, "keys of the first object")?;
        let mut rows = Vec::new();
        for (i, raw) in raw_lines.iter().enumerate().take(self.limit) {
            let line = i + 1;
            let object = self.json_line(raw, line)?;
            let mut values = Vec::with_capacity(layout.columns.len());
            for (j, key) in layout.columns.iter().enumerate() {
                match object.get(key) {
                    Some(serde_json::Value::String(s)) => values.push(Field::Text(s.clone())),
                    Some(v) => values.push(Field::Other(v.clone())),
                    None => {
                        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
                        keys.sort_unstable();
                        return Err(self.err(
                            line,
                            format!(
                                "{} is missing; this object has: {}",
                                layout.describe(j),
                                keys.join(", ")
                            ),
                        ));
                    }
                }
            }
            rows.push(self.row(&layout, line, values)?);
        }
        Ok((layout.shape, rows))
    }

    /// One line of a JSON lines file as an object.
    fn json_line(
        &self,
        raw: &[u8],
        line: usize,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        let text =
            std::str::from_utf8(raw).map_err(|_| self.err(line, "line is not valid UTF-8"))?;
        if text.trim().is_empty() {
            return Err(self.err(
                line,
                "line is empty; JSON lines needs one object on every line",
            ));
        }
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(o)) => Ok(o),
            Ok(serde_json::Value::Array(_)) if line == 1 => Err(self.err(
                line,
                "found a JSON array; st-tune reads JSON lines: one object per line",
            )),
            Ok(other) => Err(self.err(
                line,
                format!("expected a JSON object, found {}", json_kind(&other)),
            )),
            Err(e) => {
                let full = e.to_string();
                let what = full.split(" at line ").next().unwrap_or(&full);
                Err(self.err(
                    line,
                    format!("invalid JSON at column {}: {what}", e.column()),
                ))
            }
        }
    }
}

/// Every teacher embedding as long as the first row's.
fn check_widths(path: &Path, rows: &[Row]) -> Result<()> {
    let mut with = rows
        .iter()
        .filter_map(|r| Some((r.line, r.teacher.as_ref()?.len())));
    let Some((first_line, width)) = with.next() else {
        return Ok(());
    };
    match with.find(|(_, w)| *w != width) {
        Some((line, w)) => Err(Error::data(
            path,
            line,
            format!(
                "the embedding has {w} numbers, but the one on line {first_line} has {width}; \
                 every row's embedding must come from the same teacher"
            ),
        )),
        None => Ok(()),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A cell as read: text (CSV, TSV, JSON strings) or another JSON value.
enum Field {
    Text(String),
    Other(serde_json::Value),
}

/// Byte offsets of the newlines of a file, to turn offsets into 1-based line numbers.
struct LineIndex {
    newlines: Vec<usize>,
}

impl LineIndex {
    fn new(bytes: &[u8]) -> Self {
        let newlines = bytes
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b'\n')
            .map(|(i, _)| i)
            .collect();
        LineIndex { newlines }
    }

    fn line_of(&self, offset: usize) -> usize {
        1 + self.newlines.partition_point(|&n| n < offset)
    }

    /// The line a record really starts on, and the first blank line before it, if any.
    /// The csv crate positions a record where the previous one ended, and skips blank lines in
    /// between: walk back over the previous record's line ending and forward over the blank
    /// lines; more than one newline in that run means a blank line.
    fn record_start(&self, bytes: &[u8], record: &csv::ByteRecord) -> (usize, Option<usize>) {
        let pos = record.position().map_or(0, |p| p.byte() as usize);
        let is_eol = |b: &u8| *b == b'\n' || *b == b'\r';
        let start = pos + bytes[pos..].iter().take_while(|b| is_eol(b)).count();
        let gap_begin = pos - bytes[..pos].iter().rev().take_while(|b| is_eol(b)).count();
        let gap = &bytes[gap_begin..start];
        let newlines = gap.iter().filter(|&&b| b == b'\n').count();
        // At the file's start every newline is a blank line; after a record, the first one
        // ends that record.
        let blank_from = if gap_begin == 0 { 0 } else { 1 };
        let blank = (newlines > blank_from).then(|| {
            let first_blank_nl = gap
                .iter()
                .enumerate()
                .filter(|(_, &b)| b == b'\n')
                .nth(blank_from)
                .map(|(i, _)| gap_begin + i)
                .unwrap_or(gap_begin);
            self.line_of(first_blank_nl)
        });
        (self.line_of(start), blank)
    }
}

/// Lines of a text file; a non-UTF-8 or empty line is an error naming its number.
pub fn read_text_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() && i + 1 == bytes.split(|b| *b == b'\n').count() {
            break; // the newline that ends the file
        }
        let text = std::str::from_utf8(line)
            .map_err(|_| Error::data(path, i + 1, "line is not valid UTF-8"))?;
        if text.trim().is_empty() {
            return Err(Error::data(
                path,
                i + 1,
                "empty line (one text per line expected)",
            ));
        }
        out.push(text.to_string());
    }
    if out.is_empty() {
        return Err(Error::data(path, 0, "no texts in the input file"));
    }
    Ok(out)
}

/// A corpus file (`data.corpus`): one document per line, or a Parquet file's `text` column (its
/// rows counted as lines); a text given twice is an error naming both lines (documents are
/// identified by their text).
pub fn read_corpus(path: &Path) -> Result<Vec<String>> {
    let texts = match Format::from_path(path) {
        Some(Format::Parquet) => parquet::read_texts(path)?,
        _ => read_text_lines(path)?,
    };
    let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, t) in texts.iter().enumerate() {
        if let Some(j) = first.insert(t.as_str(), i) {
            return Err(Error::data(
                path,
                i + 1,
                format!("the same text as line {}: each document once", j + 1),
            ));
        }
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes `content` to a file named `name` in a fresh temp dir.
    fn file(name: &str, content: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(content)
            .unwrap();
        (dir, path)
    }

    fn read(name: &str, content: &str) -> Result<Dataset> {
        let (_dir, path) = file(name, content.as_bytes());
        read_dataset(&path, None, None, None)
    }

    /// The data error's line and message, after checking it names the file.
    fn data_error(r: Result<Dataset>, name: &str) -> (usize, String) {
        match r {
            Err(e @ Error::Data { .. }) => {
                let shown = e.to_string();
                let Error::Data { file, line, msg } = e else {
                    unreachable!()
                };
                assert!(file.ends_with(name), "{shown}");
                let at = match line {
                    0 => format!("{name}: "),
                    n => format!("{name}:{n}: "),
                };
                assert!(shown.contains(&at), "{shown}");
                (line, msg)
            }
            other => panic!("expected a data error, got {other:?}"),
        }
    }

    fn columns(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn csv_pairs_are_read_with_their_lines() {
        let d = read(
            "t.csv",
            "anchor,positive\nq1,a1\n\"q, 2\",\"a \"\"2\"\"\"\n",
        )
        .unwrap();
        assert_eq!(d.shape, RowShape::Pair);
        assert_eq!(d.rows.len(), 2);
        assert_eq!(d.rows[0].texts, ["q1", "a1"]);
        assert_eq!(d.rows[0].line, 2);
        assert_eq!(d.rows[1].texts, ["q, 2", "a \"2\""]);
        assert_eq!(d.rows[1].line, 3);
        assert_eq!(d.rows[1].score, None);
    }

    #[test]
    fn csv_triplets_and_extra_columns() {
        let d = read("t.csv", "id,anchor,positive,negative\n1,a,p,n\n").unwrap();
        assert_eq!(d.shape, RowShape::TRIPLET);
        assert_eq!(d.rows[0].texts, ["a", "p", "n"]);
    }

    #[test]
    fn an_n_tuple_file_keeps_every_negative_in_order() {
        let d = read(
            "t.csv",
            "negative_2,anchor,negative_1,positive,negative_3\nn2,a,n1,p,n3\n",
        )
        .unwrap();
        assert_eq!(d.shape, RowShape::Negatives(3));
        assert_eq!(d.rows[0].texts, ["a", "p", "n1", "n2", "n3"]);
        assert_eq!(d.prompts.len(), 5);
        let d = read(
            "t.jsonl",
            "{\"anchor\":\"a\",\"positive\":\"p\",\"negative_1\":\"x\",\"negative_2\":\"y\"}\n",
        )
        .unwrap();
        assert_eq!(d.shape, RowShape::Negatives(2));
        assert_eq!(d.rows[0].texts, ["a", "p", "x", "y"]);
        // `mine --output-format n-tuple --num-negatives 1` writes a triplet.
        let d = read("t.csv", "anchor,positive,negative_1\na,p,n\n").unwrap();
        assert_eq!(d.shape, RowShape::TRIPLET);
        assert_eq!(d.rows[0].texts, ["a", "p", "n"]);
    }

    #[test]
    fn ragged_or_mixed_negative_columns_name_the_file_and_the_missing_column() {
        let (line, msg) = data_error(
            read("t.csv", "anchor,positive,negative_1,negative_3\na,p,x,y\n"),
            "t.csv",
        );
        assert_eq!(line, 1);
        assert!(
            msg.contains("negative_1, negative_3") && msg.contains("no `negative_2`"),
            "{msg}"
        );
        let (_, msg) = data_error(
            read("t.csv", "anchor,positive,negative,negative_1\na,p,x,y\n"),
            "t.csv",
        );
        assert!(msg.contains("both `negative` and `negative_1`"), "{msg}");
        let (_, msg) = data_error(
            read(
                "t.csv",
                "anchor,positive,negative_1,negative_2,margin\na,p,x,y,1\n",
            ),
            "t.csv",
        );
        assert!(msg.contains("`margin`"), "{msg}");
    }

    #[test]
    fn data_columns_map_numbered_negatives() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(r, c)| (r.to_string(), c.to_string()))
                .collect()
        };
        let (_dir, path) = file("t.csv", b"q,d,h1,h2\na,p,x,y\n");
        let columns = map(&[
            ("anchor", "q"),
            ("positive", "d"),
            ("negative_1", "h2"),
            ("negative_2", "h1"),
        ]);
        let d = read_dataset(&path, None, Some(&columns), None).unwrap();
        assert_eq!(d.shape, RowShape::Negatives(2));
        assert_eq!(d.rows[0].texts, ["a", "p", "y", "x"]);
        // One numbered negative is a triplet's.
        let columns = map(&[("anchor", "q"), ("positive", "d"), ("negative_1", "h1")]);
        let d = read_dataset(&path, None, Some(&columns), None).unwrap();
        assert_eq!(d.shape, RowShape::TRIPLET);
        assert_eq!(d.rows[0].texts, ["a", "p", "x"]);
        // A gap is a config error naming the key.
        let columns = map(&[("anchor", "q"), ("positive", "d"), ("negative_2", "h1")]);
        let e = read_dataset(&path, None, Some(&columns), None).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("data.columns") && shown.contains("no `negative_1`"),
            "{shown}"
        );
    }

    #[test]
    fn csv_scored_pairs_parse_the_score() {
        let d = read("t.csv", "sentence1,sentence2,score\na,b,0.5\nc,d, 1 \n").unwrap();
        assert_eq!(d.shape, RowShape::Scored);
        assert_eq!(d.rows[0].score, Some(0.5));
        assert_eq!(d.rows[1].score, Some(1.0));
    }

    #[test]
    fn texts_are_kept_as_they_are() {
        let d = read("t.csv", "anchor,positive\n  spaced  ,x \n").unwrap();
        assert_eq!(d.rows[0].texts, ["  spaced  ", "x "]);
    }

    #[test]
    fn a_quoted_newline_counts_towards_the_next_rows_line() {
        let d = read("t.csv", "anchor,positive\n\"two\nlines\",p\nq,p\n").unwrap();
        assert_eq!(d.rows[0].texts[0], "two\nlines");
        assert_eq!(d.rows[0].line, 2);
        assert_eq!(d.rows[1].line, 4);
    }

    #[test]
    fn crlf_line_endings_and_a_byte_order_mark_are_fine() {
        let d = read("t.csv", "\u{feff}anchor,positive\r\nq,p\r\nq2,p2\r\n").unwrap();
        assert_eq!(d.rows.len(), 2);
        assert_eq!(d.rows[1].line, 3);
        assert_eq!(d.rows[1].texts, ["q2", "p2"]);
    }

    #[test]
    fn tsv_uses_tabs_and_keeps_quotes() {
        let d = read("t.tsv", "anchor\tpositive\n\"q\", 1\tp\n").unwrap();
        assert_eq!(d.rows[0].texts, ["\"q\", 1", "p"]);
    }

    #[test]
    fn jsonl_rows_use_their_keys() {
        let d = read(
            "t.jsonl",
            "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"score\": 0.25, \"id\": 7}\n\
             {\"score\": \"1\", \"sentence2\": \"d\", \"sentence1\": \"c\"}\n",
        )
        .unwrap();
        assert_eq!(d.shape, RowShape::Scored);
        assert_eq!(d.rows[0].texts, ["a", "b"]);
        assert_eq!(d.rows[0].score, Some(0.25));
        assert_eq!(d.rows[1].score, Some(1.0));
        assert_eq!(d.rows[1].line, 2);
    }

    #[test]
    fn dot_json_is_read_as_json_lines() {
        let d = read("t.json", "{\"anchor\": \"a\", \"positive\": \"p\"}").unwrap();
        assert_eq!(d.shape, RowShape::Pair);
    }

    #[test]
    fn an_explicit_format_beats_the_extension() {
        let (_dir, path) = file("t.txt", b"anchor\tpositive\na\tb\n");
        let d = read_dataset(&path, Some(Format::Tsv), None, None).unwrap();
        assert_eq!(d.rows[0].texts, ["a", "b"]);
    }

    #[test]
    fn an_unknown_extension_asks_for_data_format() {
        let (_dir, path) = file("t.txt", b"anchor,positive\na,b\n");
        match read_dataset(&path, None, None, None) {
            Err(Error::Config { key, msg }) => {
                assert_eq!(key, "data.format");
                assert!(msg.contains("t.txt"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn columns_map_roles_to_other_names() {
        let cols = columns(&[("anchor", "query"), ("positive", "answer")]);
        let (_dir, path) = file("t.csv", b"answer,query,x\na1,q1,z\n");
        let d = read_dataset(&path, None, Some(&cols), None).unwrap();
        assert_eq!(d.shape, RowShape::Pair);
        assert_eq!(d.rows[0].texts, ["q1", "a1"]);

        let (_dir, path) = file("t.jsonl", b"{\"query\": \"q\", \"answer\": \"a\"}\n");
        let d = read_dataset(&path, None, Some(&cols), None).unwrap();
        assert_eq!(d.rows[0].texts, ["q", "a"]);
    }

    #[test]
    fn a_mapped_column_missing_from_the_header_lists_the_header() {
        let cols = columns(&[("anchor", "query"), ("positive", "answer")]);
        let (_dir, path) = file("t.csv", b"question,answer\nq,a\n");
        let (line, msg) = data_error(read_dataset(&path, None, Some(&cols), None), "t.csv");
        assert_eq!(line, 1);
        assert!(
            msg.contains("column `query` (data.columns.anchor)"),
            "{msg}"
        );
        assert!(msg.contains("`question`, `answer`"), "{msg}");
    }

    #[test]
    fn roles_that_make_no_row_are_a_config_error() {
        let cols = columns(&[("anchor", "a"), ("score", "s")]);
        let (_dir, path) = file("t.csv", b"a,s\nx,1\n");
        match read_dataset(&path, None, Some(&cols), None) {
            Err(Error::Config { key, msg }) => {
                assert_eq!(key, "data.columns");
                assert!(msg.contains("anchor + positive"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let cols = columns(&[("query", "a")]);
        match read_dataset(&path, None, Some(&cols), None) {
            Err(Error::Config { key, msg }) => {
                assert_eq!(key, "data.columns.query");
                assert!(msg.contains("valid roles: anchor, positive"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_header_without_role_names_says_how_to_map_them() {
        let (line, msg) = data_error(read("t.csv", "question,answer\nq,a\n"), "t.csv");
        assert_eq!(line, 1);
        assert!(msg.contains("`question`, `answer`"), "{msg}");
        assert!(msg.contains("--set data.columns.anchor=question"), "{msg}");
    }

    #[test]
    fn a_short_row_names_its_line_and_counts() {
        let (line, msg) = data_error(read("t.csv", "anchor,positive\na,b\nc\n"), "t.csv");
        assert_eq!(line, 3);
        assert_eq!(msg, "expected 2 columns (as in the header), found 1");
    }

    #[test]
    fn a_long_csv_row_hints_at_quoting() {
        let (line, msg) = data_error(read("t.csv", "anchor,positive\na,b,c\n"), "t.csv");
        assert_eq!(line, 2);
        assert!(msg.contains("found 3; a text holding a comma"), "{msg}");
    }

    #[test]
    fn an_empty_text_names_the_column() {
        let (line, msg) = data_error(read("t.csv", "anchor,positive\na,b\nc,  \n"), "t.csv");
        assert_eq!(line, 3);
        assert_eq!(msg, "column `positive` is empty");
        let (line, msg) = data_error(
            read("t.jsonl", "{\"anchor\": \"\", \"positive\": \"p\"}\n"),
            "t.jsonl",
        );
        assert_eq!(line, 1);
        assert_eq!(msg, "column `anchor` is empty");
    }

    #[test]
    fn a_bad_score_is_shown() {
        let (line, msg) = data_error(
            read("t.csv", "sentence1,sentence2,score\na,b,1\nc,d,high\n"),
            "t.csv",
        );
        assert_eq!(line, 3);
        assert_eq!(msg, "score `high` in column `score` is not a number");
        let (_, msg) = data_error(
            read("t.csv", "sentence1,sentence2,score\na,b,NaN\n"),
            "t.csv",
        );
        assert!(
            msg.contains("`NaN`") && msg.contains("not a finite number"),
            "{msg}"
        );
        let (_, msg) = data_error(
            read("t.tsv", "sentence1\tsentence2\tscore\na\tb\t1e40\n"),
            "t.tsv",
        );
        assert!(msg.contains("not a finite number"), "{msg}");
        let (_, msg) = data_error(
            read(
                "t.jsonl",
                "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"score\": null}\n",
            ),
            "t.jsonl",
        );
        assert_eq!(msg, "score null in column `score` is not a number");
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let (_dir, path) = file("t.csv", b"anchor,positive\na,b\nc,\xff\xfe\n");
        let (line, msg) = data_error(read_dataset(&path, None, None, None), "t.csv");
        assert_eq!(line, 3);
        assert_eq!(msg, "line is not valid UTF-8");
        let (_dir, path) = file(
            "t.jsonl",
            b"{\"anchor\": \"a\", \"positive\": \"b\"}\n{\"anchor\": \"\xff\"}\n",
        );
        let (line, msg) = data_error(read_dataset(&path, None, None, None), "t.jsonl");
        assert_eq!(line, 2);
        assert_eq!(msg, "line is not valid UTF-8");
    }

    #[test]
    fn an_empty_file_and_a_lone_header_are_reported() {
        let (line, msg) = data_error(read("t.csv", ""), "t.csv");
        assert_eq!(line, 0);
        assert!(msg.contains("file is empty"), "{msg}");
        let (line, msg) = data_error(read("t.csv", "anchor,positive\n"), "t.csv");
        assert_eq!(line, 1);
        assert!(msg.contains("not followed by any rows"), "{msg}");
        let (_, msg) = data_error(read("t.jsonl", "\n\n"), "t.jsonl");
        assert!(msg.contains("file is empty"), "{msg}");
    }

    #[test]
    fn a_blank_line_between_rows_is_reported() {
        let (line, msg) = data_error(read("t.csv", "anchor,positive\na,b\n\nc,d\n"), "t.csv");
        assert_eq!(line, 3);
        assert!(msg.contains("line is empty"), "{msg}");
        let (line, _) = data_error(
            read("t.csv", "anchor,positive\r\na,b\r\n\r\n\r\nc,d\r\n"),
            "t.csv",
        );
        assert_eq!(line, 3);
        let (line, _) = data_error(read("t.csv", "\nanchor,positive\na,b\n"), "t.csv");
        assert_eq!(line, 1);
        let (line, msg) = data_error(
            read(
                "t.jsonl",
                "{\"anchor\": \"a\", \"positive\": \"b\"}\n\n{\"anchor\": \"a\", \"positive\": \"b\"}\n",
            ),
            "t.jsonl",
        );
        assert_eq!(line, 2);
        assert!(msg.contains("line is empty"), "{msg}");
    }

    #[test]
    fn a_whitespace_line_is_reported_as_blank() {
        let (line, msg) = data_error(read("t.csv", "anchor,positive\na,b\n   \nc,d\n"), "t.csv");
        assert_eq!(line, 3);
        assert_eq!(msg, "line is blank; remove it");
    }

    #[test]
    fn blank_lines_at_the_end_are_tolerated() {
        assert_eq!(
            read("t.csv", "anchor,positive\na,b\n\n\n").unwrap().len(),
            1
        );
        let d = read("t.jsonl", "{\"anchor\": \"a\", \"positive\": \"b\"}\n\n").unwrap();
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn limit_stops_before_later_bad_rows() {
        let (_dir, path) = file("t.csv", b"anchor,positive\na,b\nc,d\nbroken\n");
        let d = read_dataset(&path, None, None, Some(2)).unwrap();
        assert_eq!(d.len(), 2);
        assert!(read_dataset(&path, None, None, Some(3)).is_err());
        let (_dir, path) = file(
            "t.jsonl",
            b"{\"anchor\": \"a\", \"positive\": \"b\"}\nnot json\n",
        );
        assert_eq!(read_dataset(&path, None, None, Some(1)).unwrap().len(), 1);
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let (line, msg) = data_error(
            read(
                "t.jsonl",
                "{\"anchor\": \"a\", \"positive\": \"b\"}\n{\"anchor\": \"a\", \"positive\": }\n",
            ),
            "t.jsonl",
        );
        assert_eq!(line, 2);
        assert!(msg.starts_with("invalid JSON at column"), "{msg}");
        assert!(!msg.contains("line 1"), "{msg}");

        let (line, msg) = data_error(
            read(
                "t.jsonl",
                "{\"anchor\": \"a\", \"positive\": \"b\"}\n{\"anchor\": \"a\"}\n",
            ),
            "t.jsonl",
        );
        assert_eq!(line, 2);
        assert_eq!(msg, "column `positive` is missing; this object has: anchor");

        let (_, msg) = data_error(
            read("t.jsonl", "{\"anchor\": 5, \"positive\": \"b\"}\n"),
            "t.jsonl",
        );
        assert_eq!(msg, "column `anchor` must be a string, found 5");

        let (_, msg) = data_error(read("t.jsonl", "[1, 2]\n"), "t.jsonl");
        assert!(msg.contains("JSON array"), "{msg}");
        let (line, msg) = data_error(
            read(
                "t.jsonl",
                "{\"anchor\": \"a\", \"positive\": \"b\"}\n\"x\"\n",
            ),
            "t.jsonl",
        );
        assert_eq!(line, 2);
        assert_eq!(msg, "expected a JSON object, found a string");
    }

    #[test]
    fn labelled_pairs_take_labels_of_0_and_1_only() {
        let d = read("t.csv", "sentence1,sentence2,label\na,b,1\nc,d,0\n").unwrap();
        assert_eq!(d.shape, RowShape::Labeled);
        assert_eq!(d.rows[0].score, Some(1.0));
        assert_eq!(d.rows[1].score, Some(0.0));
        let (line, msg) = data_error(
            read("t.csv", "sentence1,sentence2,label\na,b,1\nc,d,0.5\n"),
            "t.csv",
        );
        assert_eq!(line, 3);
        assert_eq!(msg, "label 0.5 in column `label` must be 0 or 1");
        // A score column wins over a label column: the file stays a scored one.
        let d = read("t.csv", "sentence1,sentence2,score,label\na,b,0.3,1\n").unwrap();
        assert_eq!(d.shape, RowShape::Scored);
    }

    #[test]
    fn a_margin_column_makes_margin_triplets() {
        let d = read(
            "t.jsonl",
            "{\"anchor\": \"q\", \"positive\": \"p\", \"negative\": \"n\", \"margin\": 2.5}\n",
        )
        .unwrap();
        assert_eq!(d.shape, RowShape::Margin);
        assert_eq!(d.rows[0].texts, ["q", "p", "n"]);
        assert_eq!(d.rows[0].score, Some(2.5));
    }

    #[test]
    fn teacher_embeddings_are_json_lists_in_every_format() {
        // What `st-tune encode` writes.
        let d = read(
            "t.jsonl",
            "{\"text\": \"a\", \"embedding\": [0.5, -1, 2e-3]}\n\
             {\"text\": \"b\", \"embedding\": [1, 2, 3]}\n",
        )
        .unwrap();
        assert_eq!(d.shape, RowShape::Distill);
        assert_eq!(d.rows[0].texts, ["a"]);
        assert_eq!(d.rows[0].teacher, Some(vec![0.5, -1.0, 0.002]));
        let d = read("t.csv", "text,embedding\na,\"[1.5, 2]\"\n").unwrap();
        assert_eq!(d.rows[0].teacher, Some(vec![1.5, 2.0]));
    }

    #[test]
    fn a_bad_teacher_embedding_names_its_line() {
        let (line, msg) = data_error(
            read(
                "t.jsonl",
                "{\"text\": \"a\", \"embedding\": [1, 2]}\n{\"text\": \"b\", \"embedding\": [1, \"x\"]}\n",
            ),
            "t.jsonl",
        );
        assert_eq!(line, 2);
        assert!(
            msg.starts_with("column `embedding` must be a JSON list of numbers"),
            "{msg}"
        );
        let (_, msg) = data_error(read("t.csv", "text,embedding\na,0.5\n"), "t.csv");
        assert!(msg.contains("found 0.5"), "{msg}");
        let (line, msg) = data_error(
            read(
                "t.jsonl",
                "{\"text\": \"a\", \"embedding\": [1, 2]}\n{\"text\": \"b\", \"embedding\": [1, 2, 3]}\n",
            ),
            "t.jsonl",
        );
        assert_eq!(line, 2);
        assert_eq!(
            msg,
            "the embedding has 3 numbers, but the one on line 1 has 2; every row's embedding \
             must come from the same teacher"
        );
    }

    #[test]
    fn columns_of_two_kinds_of_rows_are_refused() {
        let (line, msg) = data_error(
            read("t.csv", "text,embedding,anchor,positive\na,[1],b,c\n"),
            "t.csv",
        );
        assert_eq!(line, 1);
        assert!(msg.contains("more than one kind of row"), "{msg}");
    }

    #[test]
    fn a_missing_file_is_an_io_error() {
        let e = read_dataset(Path::new("/nonexistent/t.csv"), None, None, None).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
    }
}
