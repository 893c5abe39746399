//! Using st-tune as a library: load a sentence-transformers folder and embed two sentences.
//!
//! cargo run --example encode -- .weights/all-MiniLM-L6-v2

use candle_core::Device;
use st_tune::model::SentenceModel;
use st_tune::train::eval::cosine;

fn main() -> Result<(), st_tune::Error> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| ".weights/all-MiniLM-L6-v2".into());
    let model = SentenceModel::load(&path, &Device::Cpu, None)?;
    let e = model.encode(
        &["A plane is taking off.", "An air plane is taking off."],
        32,
    )?;
    println!(
        "dimension {}, cosine {:.4}",
        e[0].len(),
        cosine(&e[0], &e[1])
    );
    Ok(())
}
