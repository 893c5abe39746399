//! GISTEmbedLoss's guide model (`[guide]`): loaded and checked with the run, and the tokens it
//! reads of the training rows. It runs on the trained model's device and engine, forward only,
//! without dropout or a graph (`passes.rs` embeds it beside each micro-batch); it is never
//! trained or saved.
//!
//! What it reads follows sentence-transformers' `GISTEmbedLoss`: the trained model's own tokens
//! when the two tokenizers share a vocabulary and the guide takes at least as many tokens;
//! otherwise those tokens decoded back to text (special tokens left out, so prompts and
//! truncation carry over) and tokenized again by the guide.

use crate::config::GuideSection;
use crate::data::tokenize::TextTokenizer;
use crate::data::tokenized::TokenizedData;
use crate::error::{Error, Result};
use crate::model::SentenceModel;

/// Loads the guide of `[guide]` on `device`, for inference. Every error names `guide.path`
/// (a missing folder, an unreadable tokenizer or config names its file as well).
pub fn load(section: &GuideSection, device: &candle_core::Device) -> Result<Option<SentenceModel>> {
    let Some(path) = &section.path else {
        return Ok(None);
    };
    let named = |e: Error| Error::config("guide.path", format!("cannot load the guide: {e}"));
    let mut guide = SentenceModel::load(path, device, None).map_err(named)?;
    if let Some(max) = section.max_seq_length {
        let limit = guide.spec.model.max_tokens();
        if max > limit {
            return Err(Error::config(
                "guide.max_seq_length",
                format!(
                    "is {max}, but {path} has positions for {limit} tokens; use at most {limit}"
                ),
            ));
        }
        guide.set_max_seq_length(max)?;
    }
    Ok(Some(guide))
}

/// Whether the guide cannot read the trained model's tokens as they are (sentence-transformers'
/// `must_retokenize`).
pub fn must_retokenize(trained: &TextTokenizer, guide: &TextTokenizer) -> bool {
    !trained.same_vocab(guide) || guide.max_seq_length < trained.max_seq_length
}

/// The guide's own tokens of `data` (the trained model's tokens), or None when it reads those
/// as they are. Retokenized rows carry no prompt tokens: the prompt is part of their text.
pub fn tokens(
    trained: &TextTokenizer,
    guide: &TextTokenizer,
    data: &TokenizedData,
) -> Result<Option<TokenizedData>> {
    if !must_retokenize(trained, guide) {
        return Ok(None);
    }
    let mut per_column = Vec::with_capacity(data.columns);
    for c in 0..data.columns {
        let ids: Vec<&[u32]> = data.tokens.iter().map(|r| r[c].as_slice()).collect();
        let texts = trained.decode(&ids)?;
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        per_column.push(guide.encode(&texts)?);
    }
    let tokens = (0..data.tokens.len())
        .map(|r| per_column.iter().map(|col| col[r].clone()).collect())
        .collect();
    Ok(Some(TokenizedData {
        tokens,
        scores: Vec::new(),
        teachers: Vec::new(),
        columns: data.columns,
        prompt_tokens: vec![0; data.columns],
    }))
}
