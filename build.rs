//! Records the commit Herald is built from (`herald_build_info{commit}`), or "unknown"
//! outside a git checkout. `HERALD_COMMIT` in the environment wins (packagers).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=HERALD_COMMIT");
    // The checked-out commit changes with HEAD or the branch it points to.
    for f in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    }
    let commit = std::env::var("HERALD_COMMIT").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_hexdigit()))
    });
    println!(
        "cargo:rustc-env=HERALD_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
