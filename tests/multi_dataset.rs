//! Several training sets in one run (`[[data.train]]`), through the real binary and config:
//! every batch comes from one set, taken in turn (round_robin) or in proportion to each set's
//! number of batches; each set trains with its own loss; the log and the model card name the
//! sets; a run killed and resumed ends bit-identical, and OOM retries change nothing; bad
//! entries are refused naming the key and the file.
//!
//! The job: a tiny 2-layer BERT; "sts", 24 scored pairs with CoSENT (3 batches of 8), and
//! "qa", 16 (anchor, positive) pairs with MNRL (2 batches of 8).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use serde_json::Value;
use tempfile::TempDir;

const OOMS: &str = "2:forward,5:backward,9:optimizer";

struct Job {
    dir: TempDir,
}

impl Job {
    fn new() -> Self {
        let dir = TempDir::new().unwrap();
        common::tiny_model(&dir.path().join("model"), false, 2, 11);
        common::write_data(&dir.path().join("sts.csv"), true);
        let pairs = dir.path().join("qa.csv");
        common::write_data(&pairs, false);
        // 16 rows, no text twice, so no_duplicates (MNRL's sampler) cuts exactly 2 batches.
        let text = std::fs::read_to_string(&pairs).unwrap();
        let mut lines = text.lines();
        let mut out = format!("{}\n", lines.next().unwrap());
        for (i, row) in lines.take(16).enumerate() {
            let (a, p) = row.split_once(',').unwrap();
            out += &format!("{a} q{i},{p} p{i}\n");
        }
        std::fs::write(&pairs, out).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A config training on `sets` (TOML of the `[[data.train]]` entries) with `train`'s
    /// extra keys; written to `name`.
    fn config(&self, name: &str, data: &str, sets: &str, train: &str) -> PathBuf {
        let model = self.path("model");
        let text = format!(
            "[model]\npath = {model:?}\n[data]\n{data}\n{sets}\n\
             [train]\nbatch_size = 8\nmicro_batch_size = 4\nlr = 1e-3\nlog_steps = 1\nseed = 5\n\
             {train}\n[memory]\nregrow_after = 2\n\
             [output]\ncheckpoint_steps = 2\nkeep_checkpoints = 2\n"
        );
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The two sets, `sts` first unless `qa_first`.
    fn both(&self, qa_first: bool) -> String {
        let sts = format!(
            "[[data.train]]\nname = \"sts\"\npath = {:?}\nloss = \"cosent\"\n",
            self.path("sts.csv")
        );
        let qa = format!(
            "[[data.train]]\nname = \"qa\"\npath = {:?}\nloss = \"mnrl\"\n",
            self.path("qa.csv")
        );
        match qa_first {
            true => qa + &sts,
            false => sts + &qa,
        }
    }

    /// `st-tune train` into `out`; the exit status and stdout + stderr.
    fn train(
        &self,
        config: &Path,
        out: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (ExitStatus, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_st-tune"));
        cmd.args(["train", "--config"])
            .arg(config)
            .arg("--output")
            .arg(self.path(out))
            .arg("--json")
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env("RAYON_NUM_THREADS", "2")
            .env_remove("ST_TUNE_CRASH_AT")
            .env_remove("ST_TUNE_INJECT_OOM");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = cmd.output().unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status, text)
    }

    /// The step lines of `out`'s metrics.jsonl.
    fn steps(&self, out: &str) -> Vec<Value> {
        std::fs::read_to_string(self.path(out).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l.get("loss").is_some())
            .collect()
    }

    /// Each step's set, as the log names it.
    fn sets(&self, out: &str) -> Vec<String> {
        let name = |l: &Value| l["dataset"].as_str().expect("a dataset").to_string();
        self.steps(out).iter().map(name).collect()
    }
}

fn train_ok(job: &Job, config: &Path, out: &str, env: &[(&str, &str)]) {
    let (status, text) = job.train(config, out, &[], env);
    assert!(status.success(), "{text}");
}

#[test]
fn round_robin_takes_one_batch_of_each_set_in_turn_until_the_smaller_runs_out() {
    let job = Job::new();
    let cfg = job.config(
        "rr.toml",
        "sampler = \"round_robin\"",
        &job.both(false),
        "epochs = 2",
    );
    train_ok(&job, &cfg, "rr", &[]);
    // Two rounds per epoch (qa has 2 batches): sts's third batch is left out.
    assert_eq!(job.sets("rr"), ["sts", "qa", "sts", "qa"].repeat(2));
    let card = std::fs::read_to_string(job.path("rr/final/README.md")).unwrap();
    for needle in [
        "| sts |",
        "| qa |",
        "sts.csv",
        "qa.csv",
        "round robin",
        "`mnrl`",
    ] {
        assert!(card.contains(needle), "the card names {needle}:\n{card}");
    }
}

#[test]
fn proportional_uses_every_batch_of_each_set_once_per_epoch() {
    let job = Job::new();
    let cfg = job.config(
        "p.toml",
        "sampler = \"proportional\"",
        &job.both(false),
        "epochs = 2",
    );
    train_ok(&job, &cfg, "p", &[]);
    let steps = job.steps("p");
    assert_eq!(steps.len(), 2 * (3 + 2));
    for epoch in 0..2 {
        let of = |set: &str| {
            let this = |l: &&Value| l["epoch"] == epoch && l["dataset"] == set;
            steps.iter().filter(this).count()
        };
        assert_eq!((of("sts"), of("qa")), (3, 2), "epoch {epoch}");
    }
}

/// A set's first batch in a mixed run is its first batch alone, so the run's first loss is
/// that of the same file trained alone with that loss: each set trains with its own.
#[test]
fn each_set_trains_with_its_own_loss() {
    let job = Job::new();
    for (qa_first, file, loss) in [(false, "sts.csv", "cosent"), (true, "qa.csv", "mnrl")] {
        let data = "sampler = \"round_robin\"";
        let mixed = job.config("mixed.toml", data, &job.both(qa_first), "max_steps = 2");
        let out = format!("mixed-{loss}");
        train_ok(&job, &mixed, &out, &[]);
        let single = format!("train = {:?}", job.path(file));
        let alone = job.config(
            "alone.toml",
            &single,
            "",
            &format!("loss = \"{loss}\"\nmax_steps = 1"),
        );
        let alone_out = format!("alone-{loss}");
        train_ok(&job, &alone, &alone_out, &[]);
        let first = |out: &str| job.steps(out)[0]["loss"].as_f64().unwrap();
        assert_eq!(first(&out), first(&alone_out), "{loss} first");
        assert!(
            job.steps(&alone_out)[0].get("dataset").is_none(),
            "one file: no set named"
        );
    }
}

/// The mixed run with OOMs injected (the micro-batch shrinks and grows back), killed during a
/// step and while writing a checkpoint, then resumed: the same weights, byte for byte, and the
/// same set and loss at every step, as the run never killed; and the same weights (to 1e-5) as
/// the run without OOMs.
#[test]
fn a_mixed_run_killed_and_resumed_ends_bit_identical_and_ooms_change_nothing() {
    let job = Job::new();
    let cfg = job.config("r.toml", "", &job.both(false), "max_steps = 12");
    let ooms = [("ST_TUNE_INJECT_OOM", OOMS)];
    train_ok(&job, &cfg, "reference", &ooms);
    for (i, at) in ["step:3", "checkpoint:6", "step:9"].iter().enumerate() {
        let resume: &[&str] = if i == 0 { &[] } else { &["--resume"] };
        let env = [ooms[0], ("ST_TUNE_CRASH_AT", at)];
        let (status, text) = job.train(&cfg, "killed", resume, &env);
        assert!(!status.success(), "{at}: killed\n{text}");
    }
    let (status, text) = job.train(&cfg, "killed", &["--resume"], &ooms);
    assert!(status.success(), "{text}");
    let bytes = |out: &str| std::fs::read(job.path(out).join("final/model.safetensors")).unwrap();
    assert!(
        bytes("reference") == bytes("killed"),
        "resumed weights differ"
    );
    let log = |out: &str| -> Vec<(u64, String, f64)> {
        let step = |l: &Value| {
            let (s, d) = (l["step"].as_u64().unwrap(), l["dataset"].to_string());
            (s, d, l["loss"].as_f64().unwrap())
        };
        job.steps(out).iter().map(step).collect()
    };
    assert_eq!(log("reference"), log("killed"));
    let sets = job.sets("reference");
    assert!(
        sets.contains(&"sts".into()) && sets.contains(&"qa".into()),
        "{sets:?}"
    );

    let events = std::fs::read_to_string(job.path("reference/events.jsonl")).unwrap();
    let ooms_logged = events
        .lines()
        .filter(|l| l.contains(r#""event":"oom""#))
        .count();
    assert_eq!(ooms_logged, 3, "the injected OOMs happened: {events}");
    train_ok(&job, &cfg, "clean", &[]);
    let (diff, name) = common::max_relative_difference(&job.path("clean"), &job.path("reference"));
    assert!(
        diff <= 1e-5,
        "weights differ after OOM retries: {name} by {diff}"
    );
    let start = candle_core::safetensors::load(
        job.path("model/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let end = common::weights(&job.path("clean"));
    let name = "encoder.layer.0.output.dense.weight";
    let moved = common::max_abs_diff(&start[name], &end[name]);
    assert!(moved > 1e-4, "training moved the weights by {moved} only");
}

/// Runs `sets` and returns the error text; nothing is trained.
fn refused(job: &Job, sets: &str) -> String {
    let cfg = job.config("bad.toml", "", sets, "max_steps = 1");
    let (status, text) = job.train(&cfg, "bad", &[], &[]);
    assert!(!status.success(), "refused: {text}");
    assert!(!job.path("bad/final").exists(), "nothing trained");
    text
}

#[test]
fn bad_entries_are_refused_naming_the_key_and_the_file() {
    let job = Job::new();
    let (sts, qa) = (job.path("sts.csv"), job.path("qa.csv"));
    let entry = |body: String| format!("[[data.train]]\n{body}\n");

    let text = refused(
        &job,
        &(entry(format!("path = {sts:?}\nloss = \"cosent\""))
            + &entry(format!("path = {qa:?}\nloss = \"cosent\""))),
    );
    assert!(text.contains("data.train[1].loss"), "{text}");
    assert!(
        text.contains("qa.csv") && text.contains("needs sentence1,sentence2,score"),
        "{text}"
    );

    let text = refused(
        &job,
        &(entry(format!("path = {sts:?}\nloss = \"cosent\""))
            + &entry(format!(
                "path = {qa:?}\nloss = \"mnrl\"\nprompts = {{ negative = \"query\" }}"
            ))),
    );
    assert!(text.contains("data.train[1].prompts.negative"), "{text}");
    assert!(text.contains("qa.csv does not have"), "{text}");

    let text = refused(
        &job,
        &(entry(format!("name = \"x\"\npath = {sts:?}\nloss = \"cosent\""))
            + &entry(format!("name = \"x\"\npath = {qa:?}\nloss = \"mnrl\""))),
    );
    assert!(
        text.contains("data.train") && text.contains("both named \"x\""),
        "{text}"
    );

    let text = refused(
        &job,
        &entry(format!("path = {qa:?}\ncolums = {{ anchor = \"a\" }}")),
    );
    assert!(
        text.contains("entry [0]") && text.contains("unknown field `colums`"),
        "{text}"
    );

    let text = refused(
        &job,
        &entry(format!("path = {qa:?}\ncolumns = {{ query = \"a\" }}")),
    );
    assert!(text.contains("data.train[0].columns.query"), "{text}");

    // `--set data.train[i].KEY=VALUE` reaches that entry: qa's loss set to cosent is refused
    // as an entry's own would be; an entry the file does not give or an unknown key is named.
    let cfg = job.config("set.toml", "", &job.both(false), "max_steps = 1");
    for (set, needles) in [
        (
            "data.train[1].loss=cosent",
            &["data.train[1].loss", "qa.csv", "`cosent`"][..],
        ),
        ("data.train[2].loss=mnrl", &["data.train[2]", "[0] to [1]"]),
        (
            "data.train[0].lost=mnrl",
            &["data.train[0].lost", "path, name"],
        ),
    ] {
        let (status, text) = job.train(&cfg, "set", &["--set", set], &[]);
        assert_eq!(status.code(), Some(2), "{set}: {text}");
        assert!(needles.iter().all(|n| text.contains(n)), "{set}: {text}");
    }

    // `st-tune mine --output-format n-tuple`'s rows with a loss that takes one negative.
    let ntuple = job.path("mined.csv");
    std::fs::write(&ntuple, "anchor,positive,negative_1,negative_2\na,b,c,d\n").unwrap();
    let text = refused(
        &job,
        &entry(format!("path = {ntuple:?}\nloss = \"triplet\"")),
    );
    assert!(
        text.contains("data.train[0].loss")
            && text.contains("mined.csv")
            && text.contains("n-tuples with 2 negatives")
            && text.contains("\"mnrl\""),
        "{text}"
    );
}

/// A gist set beside a CoSENT set: the guide serves the gist set's batches only, so the
/// mixed run's first gist loss is that of the gist file trained alone with the same guide.
/// `[[data.train]]`'s gist entry needs `[guide]` as `train.loss = "gist"` does.
#[test]
fn a_gist_set_takes_the_guide_beside_another_loss() {
    let job = Job::new();
    let guide = format!("[guide]\npath = {:?}\n", job.path("model"));
    let sets = format!(
        "[[data.train]]\nname = \"qa\"\npath = {:?}\nloss = \"gist\"\n\
         [[data.train]]\nname = \"sts\"\npath = {:?}\nloss = \"cosent\"\n",
        job.path("qa.csv"),
        job.path("sts.csv")
    );
    let mixed = job.config(
        "gist-mixed.toml",
        "sampler = \"round_robin\"",
        &sets,
        "max_steps = 2",
    );
    let (status, text) = job.train(&mixed, "gist-no-guide", &[], &[]);
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(
        text.contains("guide.path") && text.contains("[[data.train]]"),
        "{text}"
    );

    let with_guide = std::fs::read_to_string(&mixed).unwrap() + &guide;
    std::fs::write(&mixed, with_guide).unwrap();
    train_ok(&job, &mixed, "gist-mixed", &[]);
    assert_eq!(job.sets("gist-mixed"), ["qa", "sts"]);
    let single = format!("train = {:?}", job.path("qa.csv"));
    let alone = job.config(
        "gist-alone.toml",
        &single,
        "",
        "loss = \"gist\"\nmax_steps = 1",
    );
    let alone_text = std::fs::read_to_string(&alone).unwrap() + &guide;
    std::fs::write(&alone, alone_text).unwrap();
    train_ok(&job, &alone, "gist-alone", &[]);
    let first = |out: &str| job.steps(out)[0]["loss"].as_f64().unwrap();
    assert_eq!(first("gist-mixed"), first("gist-alone"));

    // The card gives each loss's own scale (100 for gist, 20 for cosent).
    let card = std::fs::read_to_string(job.path("gist-mixed/final/README.md")).unwrap();
    assert!(
        card.contains("100 for `gist`") && card.contains("20 for `cosent`"),
        "{card}"
    );
}
