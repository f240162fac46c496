//! The invariant that keeps stdio servers in the sandbox: this crate has no
//! way to start a program on the host. Its only way to run one is
//! `Sandbox::spawn`; a process API anywhere in its source fails this test.

#[test]
fn the_crate_cannot_start_a_host_process() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offenders = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for needle in [
            "std::process",
            "tokio::process",
            "process::Command",
            "Command::new",
            "TokioChildProcess",
            "transport-child-process",
            "libc::fork",
            "execv",
        ] {
            if text.contains(needle) {
                offenders.push(format!("{}: {needle}", path.display()));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
    // Nor through rmcp: its child-process transport stays off.
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"),
    )
    .unwrap();
    let rmcp = manifest
        .lines()
        .find(|line| line.starts_with("rmcp ="))
        .expect("rmcp in the workspace dependencies");
    assert!(
        !rmcp.contains("child-process") && !rmcp.contains("which-command"),
        "{rmcp}"
    );
}
