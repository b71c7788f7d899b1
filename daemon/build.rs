//! Records the git commit ppud is built from (`ppu_build_info{git_commit}`): `PPU_GIT_COMMIT`
//! if set (a build without `.git`, e.g. a container build, can pass it), else, in a release
//! build, `git rev-parse HEAD`. Debug builds leave it empty unless it is passed: following
//! HEAD would rebuild the daemon after every commit of a development loop.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=PPU_GIT_COMMIT");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let commit = std::env::var("PPU_GIT_COMMIT").ok().or_else(|| {
        if !release {
            return None;
        }
        // Rebuild when HEAD moves: a checkout changes HEAD, a commit the branch's ref (in the
        // common git dir when this is a worktree), a gc packed-refs.
        if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
            println!("cargo:rerun-if-changed={dir}/HEAD");
        }
        if let Some(dir) = git(&["rev-parse", "--git-common-dir"]) {
            println!("cargo:rerun-if-changed={dir}/refs/heads");
            println!("cargo:rerun-if-changed={dir}/packed-refs");
        }
        git(&["rev-parse", "HEAD"])
    });
    if let Some(c) = commit.filter(|c| !c.is_empty()) {
        println!("cargo:rustc-env=PPU_GIT_COMMIT={c}");
    }
}
