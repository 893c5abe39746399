//! Parquet files (`data.format = "parquet"` or the `.parquet` extension), as Hugging Face
//! `datasets` writes them: one column per role, strings for texts, numbers (or booleans, as
//! 0/1) for score, label and margin, a list of numbers for an embedding; snappy or zstd pages
//! (the other codecs are not compiled in). A corpus file (`data.corpus`) is a `text` column.
//! Rows go through the parquet crate's record API one row group at a time, so an error names
//! the row group and the row, as the text formats' errors name the line. A row's `line` is its
//! 1-based position in the file.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field as Cell, Row as Record};

use super::{Field, Reader};
use crate::data::{Row, RowShape};
use crate::error::{Error, Result};

impl Reader<'_> {
    pub(super) fn parquet(&self) -> Result<(RowShape, Vec<Row>)> {
        let (reader, names) = open(self.path)?;
        let layout = self.layout(&names, 0, "columns of the Parquet schema")?;
        let mut rows = Vec::new();
        walk(self.path, &reader, |record| {
            if rows.len() >= self.limit {
                return Ok(false);
            }
            let mut values = Vec::with_capacity(layout.columns.len());
            for (j, name) in layout.columns.iter().enumerate() {
                match cell(record, name) {
                    Some(c) => values.push(field(c)),
                    None => return Err(self.err(0, format!("{} is null", layout.describe(j)))),
                }
            }
            rows.push(self.row(&layout, rows.len() + 1, values)?);
            Ok(true)
        })?;
        if rows.is_empty() {
            return Err(self.err(0, "holds no rows"));
        }
        Ok((layout.shape, rows))
    }
}

/// The texts of a corpus file's `text` column, in file order.
pub(super) fn read_texts(path: &Path) -> Result<Vec<String>> {
    let (reader, names) = open(path)?;
    if !names.iter().any(|n| n == "text") {
        return Err(Error::data(
            path,
            0,
            format!(
                "a corpus file needs a `text` column; it has: {}",
                names.join(", ")
            ),
        ));
    }
    let mut texts = Vec::new();
    walk(path, &reader, |record| match cell(record, "text") {
        Some(Cell::Str(s)) if !s.trim().is_empty() => {
            texts.push(s.clone());
            Ok(true)
        }
        Some(Cell::Str(_)) => Err(Error::data(path, 0, "column `text` is empty")),
        other => Err(Error::data(
            path,
            0,
            format!(
                "column `text` must be a string, found {}",
                json(other.unwrap_or(&Cell::Null))
            ),
        )),
    })?;
    if texts.is_empty() {
        return Err(Error::data(path, 0, "holds no rows"));
    }
    Ok(texts)
}

/// The file's reader and its top-level column names.
fn open(path: &Path) -> Result<(SerializedFileReader<File>, Vec<String>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| Error::data(path, 0, format!("not a readable Parquet file: {e}")))?;
    let names = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    Ok((reader, names))
}

/// Calls `visit` on every row in file order until it returns `false`; an error, its own or the
/// file's, gets the row group and row in front of its message.
fn walk(
    path: &Path,
    reader: &SerializedFileReader<File>,
    mut visit: impl FnMut(&Record) -> Result<bool>,
) -> Result<()> {
    for g in 0..reader.num_row_groups() {
        let at = |r: usize, e: Error| match e {
            Error::Data { file, msg, .. } => Error::Data {
                file,
                line: 0,
                msg: format!("row group {g}, row {r} (counting from 0): {msg}"),
            },
            other => other,
        };
        let unreadable = |r: usize, e: parquet::errors::ParquetError| {
            at(r, Error::data(path, 0, format!("cannot read the row: {e}")))
        };
        let group = reader.get_row_group(g).map_err(|e| unreadable(0, e))?;
        let rows = group.get_row_iter(None).map_err(|e| unreadable(0, e))?;
        for (r, record) in rows.enumerate() {
            let record = record.map_err(|e| unreadable(r, e))?;
            if !visit(&record).map_err(|e| at(r, e))? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The cell of column `name`; `None` when it is null.
fn cell<'r>(record: &'r Record, name: &str) -> Option<&'r Cell> {
    match record.get_column_iter().find(|(n, _)| *n == name) {
        Some((_, Cell::Null)) | None => None,
        Some((_, c)) => Some(c),
    }
}

/// A Parquet cell as the text readers' cells: strings as text, numbers and lists of numbers as
/// JSON values (booleans as 0/1), anything else as its printed form (refused where a text or a
/// number belongs).
fn field(cell: &Cell) -> Field {
    match cell {
        Cell::Str(s) => Field::Text(s.clone()),
        other => Field::Other(json(other)),
    }
}

fn json(cell: &Cell) -> serde_json::Value {
    use serde_json::Value;
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    match cell {
        Cell::Bool(b) => Value::from(u8::from(*b)),
        Cell::Byte(x) => Value::from(*x),
        Cell::Short(x) => Value::from(*x),
        Cell::Int(x) => Value::from(*x),
        Cell::Long(x) => Value::from(*x),
        Cell::UByte(x) => Value::from(*x),
        Cell::UShort(x) => Value::from(*x),
        Cell::UInt(x) => Value::from(*x),
        Cell::ULong(x) => Value::from(*x),
        Cell::Float(x) => float(f64::from(*x)),
        Cell::Double(x) => float(*x),
        Cell::ListInternal(list) => Value::Array(list.elements().iter().map(json).collect()),
        Cell::Null => Value::Null,
        other => Value::String(other.to_string()),
    }
}
