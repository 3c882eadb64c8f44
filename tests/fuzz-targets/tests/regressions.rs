//! Replays every fuzz regression input (`fuzz/regressions/TARGET/`) and seed (`fuzz/seeds/TARGET/`)
//! through its target's body: each must return without panicking.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut v: Vec<_> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn replay(kind: &str) -> usize {
    fuzz_targets::ignore_sigpipe();
    let mut n = 0;
    for &(name, body) in fuzz_targets::TARGETS {
        for path in inputs(kind, name) {
            let data = std::fs::read(&path).unwrap();
            eprintln!("{name}: {}", path.display());
            body(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn regression_inputs_do_not_crash() {
    let n = replay("regressions");
    eprintln!("{n} regression inputs replayed");
}

#[test]
fn seeds_do_not_crash() {
    let n = replay("seeds");
    eprintln!("{n} seeds replayed");
}

#[test]
fn every_target_has_a_libfuzzer_wrapper() {
    for &(name, _) in fuzz_targets::TARGETS {
        let p = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(p.is_file(), "{} is missing", p.display());
    }
}

#[test]
fn empty_and_short_inputs() {
    fuzz_targets::ignore_sigpipe();
    for &(_, body) in fuzz_targets::TARGETS {
        for data in [&[][..], &[0], &[0xff; 12], &[1; 40]] {
            body(data);
        }
    }
}

/// Regenerate `fuzz/seeds/` from the well-formed inputs in `fuzz_targets::seeds`.
#[test]
#[ignore]
fn write_seeds() {
    for (name, seeds) in fuzz_targets::seeds::all() {
        let dir = fuzz_dir().join("seeds").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
        }
    }
}
