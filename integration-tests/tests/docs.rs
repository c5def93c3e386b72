//! The README promises what the code must keep: every metric in its table is emitted
//! somewhere in the workspace's source.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The metric names in the README's metrics table, each as the names it may stand for: a
/// row `granary_a_b_total` / `_c_total` abbreviates a sibling of the first name, sharing
/// some prefix of it.
fn documented_metrics(readme: &str) -> Vec<Vec<String>> {
    let mut names = Vec::new();
    for row in readme.lines().filter(|l| l.starts_with("| `granary_")) {
        let first_cell = row.split('|').nth(1).unwrap_or_default();
        let mut first: Vec<&str> = Vec::new();
        for quoted in first_cell.split('`').skip(1).step_by(2) {
            let name = quoted.split('{').next().unwrap_or_default();
            match name.strip_prefix('_') {
                Some(suffix) => names.push(
                    (1..first.len())
                        .map(|k| format!("{}_{suffix}", first[..k].join("_")))
                        .collect(),
                ),
                None => {
                    first = name.split('_').collect();
                    names.push(vec![name.to_string()]);
                }
            }
        }
    }
    names
}

/// The workspace's source outside tests, less `telemetry.rs`, whose lists of counters
/// name them without emitting them.
fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && name != "tests" && !name.starts_with('.') {
                sources(&path, out);
            }
        } else if name.ends_with(".rs") && name != "telemetry.rs" {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

fn product_sources() -> String {
    let mut code = String::new();
    for part in [
        "src",
        "master",
        "worker",
        "fuse-client",
        "shard-router",
        "meta-client",
        "common",
    ] {
        sources(&workspace().join(part), &mut code);
    }
    code
}

/// The counters shown at 0 before their first event are the README's and the code's,
/// and every counter the README lists without labels is one of them.
#[test]
fn the_counters_registered_at_start_are_those_documented_and_emitted() {
    use granary_common::telemetry::{CLIENT_COUNTERS, MASTER_COUNTERS, WORKER_COUNTERS};
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let documented: Vec<String> = documented_metrics(&readme).into_iter().flatten().collect();
    let code = product_sources();
    let listed: Vec<&str> = [MASTER_COUNTERS, WORKER_COUNTERS, CLIENT_COUNTERS].concat();
    for name in &listed {
        assert!(
            documented.iter().any(|d| d == name),
            "{name} is not in README.md"
        );
        assert!(
            code.contains(&format!("\"{name}\"")),
            "{name} is emitted nowhere"
        );
    }
    let unlabelled_counters = readme
        .lines()
        .filter(|l| l.starts_with("| `granary_") && !l.contains('{'))
        .flat_map(|row| row.split('|').nth(1).unwrap_or_default().split('`'))
        .filter(|n| n.starts_with("granary_") && n.ends_with("_total"));
    for name in unlabelled_counters {
        if !name.starts_with("granary_router_") && !name.starts_with("granary_s3_") {
            assert!(listed.contains(&name), "{name} is not registered at start");
        }
    }
}

#[test]
fn every_metric_the_readme_lists_is_emitted() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let names = documented_metrics(&readme);
    assert!(
        names.len() > 15,
        "the metrics table was not found: {names:?}"
    );
    let code = product_sources();
    let missing: Vec<&Vec<String>> = names
        .iter()
        .filter(|alts| !alts.iter().any(|n| code.contains(&format!("\"{n}\""))))
        .collect();
    assert!(
        missing.is_empty(),
        "documented in README.md but emitted nowhere: {missing:?}"
    );
}
