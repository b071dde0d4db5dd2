//! `protocol/` stays sans-IO: it must never depend on tokio or libp2p, so the
//! simulator can drive the same state machines without sockets or a runtime.

use std::process::Command;

#[test]
fn protocol_crate_depends_on_neither_tokio_nor_libp2p() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "tern-protocol",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(
        tree.contains("tern-protocol"),
        "unexpected cargo tree output: {tree}"
    );
    let forbidden: Vec<&str> = tree
        .lines()
        .filter(|l| {
            let name = l.split_whitespace().next().unwrap_or("");
            name == "tokio"
                || name.starts_with("tokio-")
                || name == "libp2p"
                || name.starts_with("libp2p-")
                || name == "mio"
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "protocol/ pulls in IO crates: {forbidden:?}"
    );
}
