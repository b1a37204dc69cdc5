//! Replays every saved fuzz input through its target (issue "Robustness and security"):
//! fuzz/corpus/<target>/ holds what the fuzzers kept (minimized), fuzz/regressions/<target>/
//! every input that once crashed. A panic here is a regression; the fuzzers themselves run
//! on demand (see fuzz/Cargo.toml).

use std::path::Path;

use netbird_proxy::fuzzing::TARGETS;

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_saved_fuzz_input_is_handled_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, run) in TARGETS {
        let corpus = inputs(&root.join("corpus").join(target));
        let regressions = inputs(&root.join("regressions").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} is empty: run the fuzzer and commit its minimized corpus"
        );
        for (name, data) in corpus.iter().chain(&regressions) {
            let outcome = std::panic::catch_unwind(|| run(data));
            assert!(outcome.is_ok(), "{target}: input {name} panicked");
        }
    }
}
