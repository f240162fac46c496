//! What operators' own tools say about the files we ship, each run the way
//! an operator runs it: kubernetes-validate (schemas of current Kubernetes
//! versions) and checkov (policy) on the rendered kustomizations, checkov
//! and hadolint on every Dockerfile, yamllint on every YAML file, and
//! cargo audit against the RustSec snapshot in ../shared/advisory-db. The
//! tools come from `scripts/ensure-tools`, pinned; every exception is in a
//! checked-in configuration with its reason beside it.

use std::path::PathBuf;
use std::process::{Command, Output};

use bulkhead_deploy::{kustomize_build, repository};

/// The oldest Kubernetes we support (`preStop.sleep`) and the newest the
/// validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.33.0", "1.37.0"];

fn tool(program: &str) -> Command {
    let mut command = Command::new(program);
    command.current_dir(repository());
    command
}

fn run(mut command: Command, what: &str) -> Output {
    command.output().unwrap_or_else(|e| {
        panic!("{what} runs (scripts/test puts scripts/ensure-tools' bin folder on PATH): {e}")
    })
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The repository's tracked files matching a git pathspec.
fn tracked(pathspecs: &[&str]) -> Vec<String> {
    let output = run(
        {
            let mut git = tool("git");
            git.arg("ls-files").args(pathspecs);
            git
        },
        "git",
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Both kustomizations rendered by kustomize into files.
fn rendered() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = [("bulkhead", ""), ("sandboxd", "sandboxd")]
        .into_iter()
        .map(|(name, sub)| {
            let file = dir.path().join(format!("{name}.yaml"));
            std::fs::write(&file, kustomize_build(sub)).unwrap();
            file
        })
        .collect();
    (dir, files)
}

#[test]
fn the_manifests_are_valid_for_current_kubernetes_versions() {
    let (_dir, files) = rendered();
    for version in KUBERNETES_VERSIONS {
        let mut validate = Command::new("kubernetes-validate");
        validate
            .args(["--strict", "--quiet", "-k", version])
            .args(&files);
        let output = run(validate, "kubernetes-validate");
        assert!(
            output.status.success(),
            "Kubernetes {version}: {}",
            text(&output)
        );
    }
}

#[test]
fn checkov_finds_nothing_in_the_manifests_and_dockerfiles() {
    let (_dir, manifests) = rendered();
    let dockerfiles = tracked(&["*Dockerfile"]);
    assert!(dockerfiles.len() >= 4, "{dockerfiles:?}");
    let mut checkov = tool("checkov");
    // No network: checkov's optional download of its guideline texts is
    // skipped; the checks themselves are local.
    checkov
        .env("BC_SKIP_MAPPING", "TRUE")
        .args(["--config-file", ".checkov.yaml", "--compact", "--quiet"])
        .args(["--framework", "kubernetes", "dockerfile"]);
    for file in manifests
        .iter()
        .map(|f| f.display().to_string())
        .chain(dockerfiles)
    {
        checkov.args(["-f", &file]);
    }
    let output = run(checkov, "checkov");
    let report = text(&output);
    assert!(
        output.status.success() && !report.contains("FAILED for resource"),
        "{report}"
    );
    assert!(report.contains("Passed checks"), "checkov ran: {report}");
}

#[test]
fn every_dockerfile_passes_hadolint() {
    let dockerfiles = tracked(&["*Dockerfile"]);
    let mut hadolint = tool("hadolint");
    hadolint.args(&dockerfiles);
    let output = run(hadolint, "hadolint");
    assert!(
        output.status.success() && output.stdout.is_empty(),
        "{}",
        text(&output)
    );
}

#[test]
fn every_yaml_file_passes_yamllint() {
    let files = tracked(&["*.yaml", "*.yml"]);
    assert!(files.len() >= 10, "{files:?}");
    let mut yamllint = tool("yamllint");
    yamllint
        .args(["-c", ".yamllint.yaml", "-f", "parsable", "--strict"])
        .args(&files);
    let output = run(yamllint, "yamllint");
    assert!(output.status.success(), "{}", text(&output));
}

/// The advisory snapshot beside the project (see its SNAPSHOT file).
fn advisory_db() -> PathBuf {
    let db = repository().join("../shared/advisory-db");
    assert!(
        db.join("crates").is_dir(),
        "the RustSec snapshot is at {}",
        db.display()
    );
    db
}

#[test]
fn no_crate_in_the_lock_file_has_an_open_advisory() {
    let mut audit = tool("cargo-audit");
    audit
        .arg("audit")
        .arg("--db")
        .arg(advisory_db())
        .args(["--no-fetch", "--deny", "warnings"])
        // The snapshot is older than the day the suite runs, on purpose.
        .arg("--stale");
    let output = run(audit, "cargo-audit");
    assert!(output.status.success(), "{}", text(&output));
}

/// An advisory ignored in .cargo/audit.toml names a crate that no
/// workspace crate compiles, on any target, through any kind of edge.
#[test]
fn every_ignored_advisory_is_for_a_crate_never_compiled() {
    let config = std::fs::read_to_string(repository().join(".cargo/audit.toml")).unwrap();
    let ignored: Vec<&str> = config
        .lines()
        .filter_map(|line| line.trim().strip_prefix('"'))
        .filter_map(|rest| rest.split('"').next())
        .filter(|id| id.starts_with("RUSTSEC-"))
        .collect();
    assert!(!ignored.is_empty());
    for id in ignored {
        let advisory = walk(&advisory_db().join("crates"))
            .into_iter()
            .find(|path| {
                path.file_name()
                    .is_some_and(|n| n == format!("{id}.md").as_str())
            })
            .unwrap_or_else(|| panic!("{id} is in the snapshot"));
        let krate = advisory
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let mut tree = tool("cargo");
        tree.args(["tree", "--workspace", "-e", "all", "--target", "all", "-i"])
            .arg(&krate);
        let output = run(tree, "cargo tree");
        assert!(
            output.stdout.is_empty(),
            "{id}: {krate} is compiled into the workspace:\n{}",
            text(&output)
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
