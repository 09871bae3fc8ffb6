//! Shell completions and man pages, generated from the command line's own definition so
//! they list every subcommand and option the binary takes.

use std::{io::Write as _, path::Path};

use anyhow::{Context as _, Result, bail};

/// Prints the completion script of `shell` for `cmd` on stdout.
pub fn completions(shell: clap_complete::Shell, mut cmd: clap::Command) -> Result<()> {
    // Into memory first: clap_complete panics on a failed write, and `| head` is no failure.
    let mut script = Vec::new();
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(())
}

/// Writes `cmd`'s man page and one per visible subcommand (`memtrace-memleak.1`, ...) into
/// `dir`, which is created if missing.
pub fn man_pages(dir: &Path, cmd: clap::Command) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("{} is not a directory: give the directory to write the man pages in", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir).with_context(|| format!("cannot write man pages in {}", dir.display()))
}
