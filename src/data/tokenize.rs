//! The model's tokenizer (tokenizer.json), set up as sentence-transformers uses it: truncation
//! to `max_seq_length` (special tokens included), no padding (batches pad themselves), optional
//! lower-casing from `sentence_bert_config.json`.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub max_seq_length: usize,
    pub lower_case: bool,
    pub pad_id: u32,
}

impl TextTokenizer {
    pub fn load(path: &Path, max_seq_length: usize, lower_case: bool) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| Error::model(path, format!("cannot read tokenizer: {e}")))?;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| ["[PAD]", "<pad>"].iter().find_map(|t| inner.token_to_id(t)))
            .unwrap_or(0);
        inner.with_padding(None);
        let mut tok = Self {
            inner,
            max_seq_length,
            lower_case,
            pad_id,
        };
        tok.set_max_seq_length(max_seq_length)?;
        Ok(tok)
    }

    pub fn set_max_seq_length(&mut self, max: usize) -> Result<()> {
        self.max_seq_length = max;
        self.inner
            .with_truncation(Some(TruncationParams {
                max_length: max,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(())
    }

    /// How many leading tokens `prompt` puts before a text: its tokens with the special tokens
    /// added, less a trailing special token ([SEP]), as sentence-transformers counts them.
    pub fn prompt_length(&self, prompt: &str) -> Result<usize> {
        let prompt = if self.lower_case {
            prompt.to_lowercase()
        } else {
            prompt.to_string()
        };
        let enc = self
            .inner
            .encode(prompt, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let trailing_special = enc.get_special_tokens_mask().last() == Some(&1);
        Ok(enc.len() - usize::from(trailing_special))
    }

    /// The text of each row of ids, special tokens left out (`batch_decode(ids,
    /// skip_special_tokens=True)`): what a model with another vocabulary reads of them.
    pub fn decode(&self, rows: &[&[u32]]) -> Result<Vec<String>> {
        self.inner
            .decode_batch(rows, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Whether `other` maps the same tokens to the same ids (`get_vocab()` compared).
    pub fn same_vocab(&self, other: &TextTokenizer) -> bool {
        self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    /// Token ids of each text, special tokens added, truncated.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let texts: Vec<String> = texts
            .iter()
            .map(|t| {
                if self.lower_case {
                    t.to_lowercase()
                } else {
                    t.to_string()
                }
            })
            .collect();
        let enc = self
            .inner
            .encode_batch(texts, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }
}
