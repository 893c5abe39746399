//! Model argument -> local folder. A local folder is used as it is; anything else is taken as a
//! Hugging Face hub id (`sentence-transformers/all-MiniLM-L6-v2`) and resolved through hf-hub:
//! the local cache first (HF_HOME respected), then a download unless HF_HUB_OFFLINE is set.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;

use crate::error::{Error, Result};

/// Files fetched for a hub model; the first three must exist, the rest only if the repo has them.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json", "model.safetensors"];
const OPTIONAL: &[&str] = &[
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

pub fn resolve(model: &str) -> Result<PathBuf> {
    let local = Path::new(model);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    if local.exists() || !looks_like_hub_id(model) {
        return Err(Error::model(
            local,
            "not a model folder, and not a hub id of the form `owner/name`",
        ));
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    let cache = Cache::from_env().model(model.to_string());
    let cached: Vec<_> = REQUIRED.iter().map(|f| cache.get(f)).collect();
    if let Some(Some(first)) = cached.first() {
        if cached.iter().all(Option::is_some) {
            return Ok(first
                .parent()
                .expect("cached files sit in a snapshot folder")
                .to_path_buf());
        }
    }
    if offline {
        return Err(Error::model(
            local,
            "HF_HUB_OFFLINE is set and the model is not in the Hugging Face cache \
             (HF_HOME). Download it once with network access, or pass a local folder",
        ));
    }
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::model(local, format!("cannot reach the Hugging Face hub: {e}")))?
        .model(model.to_string());
    let mut folder = None;
    for f in REQUIRED {
        let p = api.get(f).map_err(|e| {
            Error::model(
                local,
                format!(
                    "cannot download {f} from the Hugging Face hub: {e}. Check the id and \
                         the network, or pass a local folder"
                ),
            )
        })?;
        folder.get_or_insert(p.parent().expect("snapshot folder").to_path_buf());
    }
    for f in OPTIONAL {
        let _ = api.get(f); // absent in plain Hugging Face repos; the loader says what it assumes
    }
    Ok(folder.expect("REQUIRED is not empty"))
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<_> = s.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}
