//! `gateway-origin --config FILE`: loads settings (defaults, file, `GATEWAY__*` env), sets up
//! logging and runs the origin. Everything else lives in the library.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use gateway_origin::Application;
use gateway_origin::settings::{LogFormat, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "gateway-origin",
    about = "The origin tier of the LLM API gateway",
    version
)]
struct Cli {
    /// A TOML settings file; compiled-in defaults apply without one.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let settings = Settings::load(cli.config.as_deref(), &env)?;
    let filter =
        tracing_subscriber::EnvFilter::try_new(&settings.log.filter).context("log.filter")?;
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter);
    match settings.log.format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.init(),
    }
    let app = Application::build(settings)?;
    tracing::info!(addr = %app.addr(), "gateway-origin listening");
    app.run().await.context("server")
}
