//! Drives a Python script that runs an official SDK (from `.local/venv`) against a stack's
//! edge: the script reports on stdout, one JSON message per line (`{"settle": n}` asks for the
//! stack to settle after `n` requests, `{"summary": …}` ends it); the tests assert.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::repo_root;
use crate::stack::{ACME, Stack};

/// The venv's interpreter; a clear failure (never a skip) when it is missing.
pub fn venv_python() -> PathBuf {
    let python = repo_root().join(".local/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `just python-venv` (or `just setup`) to install the official \
         clients (openai, anthropic) the SDK tests drive",
        python.display()
    );
    python
}

/// Runs `tests/python/<script>` against the stack's edge with acme's key, settling the stack
/// whenever it asks, and returns its summary. Fails the test when the script fails, prints no
/// summary, or takes longer than `within` (an error saying which, with the script's stderr).
pub async fn run_sdk_script(
    stack: &Stack,
    script: &str,
    within: Duration,
) -> anyhow::Result<Value> {
    let path = repo_root().join("tests/python").join(script);
    let mut child = Command::new(venv_python())
        .arg(&path)
        .arg(stack.edge.url())
        .args(["--api-key", ACME, "--settle-on-stdin"])
        // Loopback only: never through a proxy from the environment.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("the venv's python runs")?;
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        bail!("{script}: no stdio pipes");
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut summary = None;
    let talk = async {
        while let Some(line) = lines.next_line().await.context("script output")? {
            let Ok(message) = serde_json::from_str::<Value>(&line) else {
                println!("{script}: {line}");
                continue;
            };
            if let Some(sent) = message["settle"].as_u64() {
                stack.count_edge_requests(sent);
                stack.settle().await;
                stdin.write_all(b"\n").await.context("script stdin")?;
            } else if message["summary"].is_object() {
                summary = Some(message["summary"].clone());
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(within, talk)
        .await
        .with_context(|| format!("{script} did not finish within {within:?}"))??;
    let status = child.wait().await.context("script exit status")?;
    let mut errors = String::new();
    stderr
        .read_to_string(&mut errors)
        .await
        .context("script stderr")?;
    if !status.success() {
        bail!("{script} failed ({status}):\n{errors}");
    }
    summary.with_context(|| format!("{script} printed no summary:\n{errors}"))
}
