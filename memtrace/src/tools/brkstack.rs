//! brkstack: (stub, to be written).

use anyhow::{Result, bail};

use crate::tools::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
}

pub async fn run(_args: Args) -> Result<()> {
    bail!("brkstack is not written yet")
}
