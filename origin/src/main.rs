//! `gateway-origin --config FILE`: loads settings (defaults, file, `GATEWAY__*` env), sets up
//! logging and runs the origin. Everything else lives in the library.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use gateway_origin::Application;
use gateway_origin::settings::{LogFormat, Settings};
use gateway_origin::telemetry::Telemetry;
use gateway_origin::{log_format, request_scope};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
    // Spans are exported only when an endpoint is configured; the layer is then added beside
    // the log output, and the guard flushes what is buffered when the server stops.
    let (telemetry, otel) = match &settings.log.otlp_endpoint {
        Some(endpoint) => {
            let (telemetry, layer) = Telemetry::otlp(endpoint, &settings.log.service_name)?;
            (Some(telemetry), Some(layer))
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match settings.log.format {
        LogFormat::Json => {
            // The JSON layer writes a request's scope as its span, so a request needs a span
            // only when spans are exported (OpenTelemetry parents hang off it).
            if telemetry.is_none() {
                request_scope::enable();
            }
            registry.with(log_format::json_lines()).init();
        }
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).init(),
    }
    let app = Application::build(settings)?;
    tracing::info!(addr = %app.addr(), "gateway-origin listening");
    let served = app.run().await.context("server");
    drop(telemetry);
    served
}
