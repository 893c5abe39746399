//! Parquet files (`data.format = "parquet"` or the `.parquet` extension), as Hugging Face
//! `datasets` writes them: one column per role, strings for texts, numbers (or booleans, as
//! 0/1) for score, label and margin, a list of numbers for an embedding; snappy or zstd pages
//! (the other codecs are not compiled in). Rows go through the parquet crate's record API one
//! row group at a time, so an error names the row group and the row, as the text formats'
//! errors name the line. A row's `line` is its 1-based position in the file.

use std::fs::File;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field as Cell;

use super::{Field, Reader};
use crate::data::{Row, RowShape};
use crate::error::{Error, Result};

impl Reader<'_> {
    pub(super) fn parquet(&self) -> Result<(RowShape, Vec<Row>)> {
        let file = File::open(self.path).map_err(|e| Error::io(self.path, e))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| self.err(0, format!("not a readable Parquet file: {e}")))?;
        let names: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let layout = self.layout(&names, 0, "columns of the Parquet schema")?;
        let mut rows = Vec::new();
        for g in 0..reader.num_row_groups() {
            let at = |r: usize, e: Error| match e {
                Error::Data { file, msg, .. } => Error::Data {
                    file,
                    line: 0,
                    msg: format!("row group {g}, row {r} (counting from 0): {msg}"),
                },
                other => other,
            };
            let read_err = |r: usize, e: parquet::errors::ParquetError| {
                at(r, self.err(0, format!("cannot read the row: {e}")))
            };
            let group = reader.get_row_group(g).map_err(|e| read_err(0, e))?;
            let iter = group.get_row_iter(None).map_err(|e| read_err(0, e))?;
            for (r, record) in iter.enumerate() {
                if rows.len() >= self.limit {
                    return Ok((layout.shape, rows));
                }
                let record = record.map_err(|e| read_err(r, e))?;
                let mut values = Vec::with_capacity(layout.columns.len());
                for (j, name) in layout.columns.iter().enumerate() {
                    match record.get_column_iter().find(|(n, _)| *n == name) {
                        Some((_, Cell::Null)) | None => {
                            return Err(at(
                                r,
                                self.err(0, format!("{} is null", layout.describe(j))),
                            ))
                        }
                        Some((_, cell)) => values.push(field(cell)),
                    }
                }
                let line = rows.len() + 1;
                rows.push(self.row(&layout, line, values).map_err(|e| at(r, e))?);
            }
        }
        if rows.is_empty() {
            return Err(self.err(0, "holds no rows"));
        }
        Ok((layout.shape, rows))
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
