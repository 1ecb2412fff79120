//! What the edge says about each request once it is answered: one JSON log line on stdout (the
//! header vocabulary's field names) and, for an authenticated request, one usage record on the
//! `usage` log endpoint, which Fastly batches to the origin's ingest route. Never credentials,
//! prompts or completions; the usage record not even the cache key.

use std::io::Write as _;
use std::time::Instant;

use fastly::Response;
use fastly::log::Endpoint;
use gateway_common::entry::Entry;
use gateway_common::route::Route;
use gateway_common::usage::{
    Outcome, SpanRecord, Tier, USAGE_ENDPOINT, USAGE_VERSION, UsageRecord,
};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use crate::names::{X_CACHE, X_CACHE_LAYER};
use crate::trace::edge_log;
use crate::{KvRead, header_resp};

/// One request's account, filled in as the request is handled.
pub struct LogLine {
    method: String,
    path: String,
    /// The Fastly POP, read once for both lines.
    pop: String,
    pub tenant: Option<String>,
    /// The edge's span, carried in the usage record for the origin to export; its trace id
    /// (the client's, or one the edge started) is the log line's.
    pub span: Option<SpanRecord>,
    pub key: Option<String>,
    pub kv: Option<KvRead>,
    /// Write the usage record (`edge_config.usage_log`); off until the settings are read.
    pub usage_log: bool,
    /// The answer came from the origin (its `x-cache-layer` names the tier); otherwise the
    /// edge produced it.
    pub from_origin: bool,
    /// The entry a cache answer at the edge came from: its model and recorded usage.
    served: Option<(String, u64, u64)>,
    bytes: u64,
    status: u16,
    cache: String,
    layer: String,
    /// The origin region that answered (`none` when none did), once the origin was asked.
    pub region: Option<String>,
    /// Every region tried, with how it ended (`x-upstream-tried`).
    pub tried: Option<String>,
    /// `auth`, `kv`, `origin` durations (ms), as in `Server-Timing`.
    pub steps: Vec<(&'static str, f64)>,
    total_ms: f64,
}

impl LogLine {
    pub fn new(req: &fastly::Request) -> LogLine {
        LogLine {
            method: req.get_method_str().to_owned(),
            path: req.get_path().to_owned(),
            pop: pop(),
            tenant: None,
            span: None,
            key: None,
            kv: None,
            usage_log: false,
            from_origin: false,
            served: None,
            bytes: 0,
            status: 0,
            cache: String::new(),
            layer: String::new(),
            region: None,
            tried: None,
            steps: Vec::new(),
            total_ms: 0.0,
        }
    }

    /// The edge answers from `entry` (a hit, or stale): what it saved, and its size (the
    /// bytes sent when the answer is not replayed as a stream).
    pub fn served_from(&mut self, entry: &Entry) {
        let envelope = &entry.envelope;
        self.bytes = entry.body.len() as u64;
        let usage = envelope.usage.as_ref();
        self.served = Some((
            envelope.model.clone(),
            usage.map_or(0, |u| u.prompt_tokens),
            usage.map_or(0, |u| u.completion_tokens),
        ));
    }

    /// The entry named by [`LogLine::served_from`] did not answer after all.
    pub fn not_served(&mut self) {
        self.served = None;
        self.bytes = 0;
    }

    pub fn finish(&mut self, resp: &Response, started: Instant) {
        self.status = resp.get_status().as_u16();
        self.cache = header_resp(resp, &X_CACHE).unwrap_or("-").to_owned();
        self.layer = header_resp(resp, &X_CACHE_LAYER).unwrap_or("-").to_owned();
        if let Some(len) = resp.get_content_length() {
            self.bytes = len as u64;
        }
        self.total_ms = crate::ms(started);
    }

    fn route(&self) -> &str {
        match Route::from_path(&self.path) {
            Some(route) => route.as_str(),
            None => &self.path,
        }
    }

    /// Why a KV entry was refused: a sealed one that did not open is `unopenable` or
    /// `unknown_key_id` (what the origin counts from the usage record, and an operator's log
    /// query from this line); such an entry is never served.
    fn kv_reject(&self) -> Option<&'static str> {
        match self.kv? {
            KvRead::Miss(miss) => miss.reason(),
            _ => None,
        }
    }

    /// The stdout line (Fastly's log tailing; the tests read it under Viceroy), serialized
    /// straight from this account and written in one piece.
    pub fn emit(&self) {
        let line = StdoutLine {
            tier: "edge",
            pop: &self.pop,
            method: &self.method,
            route: self.route(),
            status: self.status,
            cache: &self.cache,
            layer: &self.layer,
            kv: self.kv.map(KvRead::as_str),
            kv_reject: self.kv_reject(),
            tenant: self.tenant.as_deref(),
            trace_id: self.span.as_ref().map(|span| span.trace_id.as_str()),
            key: self.key.as_deref(),
            region: self.region.as_deref(),
            tried: self.tried.as_deref(),
            total_ms: round2(self.total_ms),
            steps: Steps(&self.steps),
        };
        let Ok(mut bytes) = serde_json::to_vec(&line) else {
            return;
        };
        bytes.push(b'\n');
        // Nowhere to report a failed write to stdout: the line is lost, the answer is not.
        let _ = std::io::stdout().lock().write_all(&bytes);
    }

    /// The usage record, for an authenticated request; `None` before authentication (an
    /// unknown key is nobody's usage) or when `usage_log` is off.
    pub fn usage(&self, now: u64) -> Option<UsageRecord> {
        let tenant = self.tenant.clone().filter(|_| self.usage_log)?;
        let layer = if self.from_origin {
            // An origin answer without the header (an error it produced) is the origin's.
            Tier::from_layer(&self.layer).unwrap_or(Tier::Origin)
        } else {
            Tier::Edge
        };
        let cache = (self.cache != "-").then_some(self.cache.as_str());
        let outcome = Outcome::classify(self.status, cache);
        // Only a cache answer at the edge saves tokens the origin did not already count.
        let (model, prompt, completion) = match (&self.served, layer, outcome) {
            (Some(served), Tier::Edge, Outcome::Hit | Outcome::Stale) => served.clone(),
            _ => (String::new(), 0, 0),
        };
        Some(UsageRecord {
            v: USAGE_VERSION,
            ts: now,
            tenant,
            route: Route::from_path(&self.path)
                .map_or("other", Route::as_str)
                .to_owned(),
            layer,
            outcome,
            status: self.status,
            model,
            saved_prompt_tokens: prompt,
            saved_completion_tokens: completion,
            bytes: self.bytes,
            total_ms: round2(self.total_ms),
            steps: self
                .steps
                .iter()
                .map(|(step, ms)| ((*step).to_owned(), round2(*ms)))
                .collect(),
            pop: self.pop.clone(),
            region: self
                .region
                .clone()
                .filter(|region| region != "none")
                .unwrap_or_default(),
            span: self.span.clone(),
            kv_reject: self.kv_reject().unwrap_or_default().to_owned(),
        })
    }

    /// Writes the usage record to the `usage` log endpoint: one write, one line. A failure is
    /// logged and forgotten: metering must never fail a request.
    pub fn emit_usage(&self, now: u64) {
        let Some(record) = self.usage(now) else {
            return;
        };
        let mut endpoint = Endpoint::from_name(USAGE_ENDPOINT);
        if let Err(e) = endpoint.write_all(record.to_line().as_bytes()) {
            edge_log!("usage record not written ({e})");
        }
    }
}

/// The stdout line's members. Absent values are written as `null`, so every line has every
/// member; each step is a `<step>_ms` member.
#[derive(Serialize)]
struct StdoutLine<'a> {
    tier: &'static str,
    pop: &'a str,
    method: &'a str,
    route: &'a str,
    status: u16,
    cache: &'a str,
    layer: &'a str,
    kv: Option<&'static str>,
    /// Why a KV entry was refused: a sealed one that did not open is `unopenable` or
    /// `unknown_key_id` (what an operator's log query counts); never served.
    kv_reject: Option<&'static str>,
    tenant: Option<&'a str>,
    trace_id: Option<&'a str>,
    key: Option<&'a str>,
    region: Option<&'a str>,
    tried: Option<&'a str>,
    total_ms: f64,
    #[serde(flatten)]
    steps: Steps<'a>,
}

/// `auth_ms`, `kv_ms`, `origin_ms`: one member per step, rounded as `total_ms` is.
struct Steps<'a>(&'a [(&'static str, f64)]);

impl Serialize for Steps<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (step, took) in self.0 {
            map.serialize_entry(&StepName(step), &round2(*took))?;
        }
        map.end()
    }
}

/// A step's member name, written without building a `String`.
struct StepName<'a>(&'a str);

impl Serialize for StepName<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}_ms", self.0))
    }
}

/// The Fastly POP (`FASTLY_POP`), empty under Viceroy.
fn pop() -> String {
    std::env::var("FASTLY_POP").unwrap_or_default()
}

fn round2(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}
