//! The origin's log lines as JSON (`log.format = "json"`): one object per event, in the shape
//! tracing-subscriber's JSON formatter writes (`timestamp`, `level`, `fields` with `message`,
//! `target`, and `spans`: the spans in scope, outermost first, each with its fields and
//! `name`). Every line of a request carries its request span, and with it the `trace_id`: a
//! tracing span, or the task's `request_scope` written as one.
//!
//! Written here rather than by tracing-subscriber's formatter because a line is on the hit path
//! of every request: callgrind counted 34k instructions for the request line with the request
//! span (tracing-subscriber keeps a span's fields as a JSON string and parses it back for every
//! line) and 36k with json-subscriber (which builds a `serde_json::Value` per line). Here a
//! span's fields are written as JSON once, when it is created, and copied into each line.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use gateway_common::canonical::{write_json_string, write_json_string_contents};
use gateway_common::traceparent::TraceIdDisplay;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::request_scope;

/// A line longer than this is not kept in the per-thread buffer after it is written.
const KEPT_CAPACITY: usize = 16 * 1024;

/// The layer that writes the lines: to stdout from [`json_lines`], elsewhere with
/// [`JsonLines::with_writer`].
pub struct JsonLines<W = fn() -> io::Stdout> {
    make_writer: W,
}

impl<W> fmt::Debug for JsonLines<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JsonLines")
    }
}

/// JSON lines on stdout.
pub fn json_lines() -> JsonLines {
    JsonLines {
        make_writer: io::stdout,
    }
}

impl<W> JsonLines<W> {
    /// The same lines, written to what `make_writer` makes (one `write_all` per line).
    pub fn with_writer<W2>(self, make_writer: W2) -> JsonLines<W2>
    where
        W2: for<'w> MakeWriter<'w> + 'static,
    {
        JsonLines { make_writer }
    }
}

/// A span's fields as JSON members (`"route":"chat.completions","trace_id":"…"`), written when
/// the span is created (and extended when a field is recorded later), kept in its extensions.
struct SpanFields(String);

impl<S, W> Layer<S> for JsonLines<W>
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = String::new();
        attrs.record(&mut Members::new(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    /// A field recorded after creation is appended: the origin only records fields it
    /// declared empty (`attempt` of `provider.attempt`), so no member appears twice.
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            values.record(&mut Members::after(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with(|line| {
            // An event logged while a line is being written (a `Debug` impl that logs) gets a
            // buffer of its own rather than a panic.
            let mut own = String::new();
            let mut borrowed = line.try_borrow_mut();
            let out = match borrowed.as_deref_mut() {
                Ok(buffer) => buffer,
                Err(_) => &mut own,
            };
            out.clear();
            write_line(out, event, &ctx);
            // A failed write of a log line has nowhere better to be reported.
            let _ = self
                .make_writer
                .make_writer_for(event.metadata())
                .write_all(out.as_bytes());
            if out.capacity() > KEPT_CAPACITY {
                *out = String::new();
            }
        });
    }
}

fn write_line<S>(out: &mut String, event: &Event<'_>, ctx: &Context<'_, S>)
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    let metadata = event.metadata();
    out.push_str("{\"timestamp\":\"");
    write_timestamp(out, SystemTime::now());
    out.push_str("\",\"level\":\"");
    out.push_str(metadata.level().as_str());
    out.push_str("\",\"fields\":{");
    event.record(&mut Members::new(out));
    out.push_str("},\"target\":");
    write_json_string(out, metadata.target());
    let request = request_scope::current();
    let spans = ctx.event_scope(event);
    if request.is_some() || spans.is_some() {
        out.push_str(",\"spans\":[");
        // A request run in a scope rather than a span: written as its span would be.
        if let Some(request) = request {
            out.push_str("{\"route\":");
            write_json_string(out, request.route);
            let _ = write!(
                out,
                ",\"trace_id\":\"{}\",\"name\":\"request\"}}",
                TraceIdDisplay(request.trace_id)
            );
        }
        for (i, span) in spans.into_iter().flat_map(|s| s.from_root()).enumerate() {
            if i > 0 || request.is_some() {
                out.push(',');
            }
            out.push('{');
            let extensions = span.extensions();
            if let Some(SpanFields(fields)) = extensions.get::<SpanFields>()
                && !fields.is_empty()
            {
                out.push_str(fields);
                out.push(',');
            }
            out.push_str("\"name\":");
            write_json_string(out, span.name());
            out.push('}');
        }
        out.push(']');
    }
    out.push_str("}\n");
}

/// `SystemTime` as RFC 3339 in UTC with microseconds (`2026-12-01T03:19:04.522295Z`), as
/// tracing-subscriber writes it.
fn write_timestamp(out: &mut String, now: SystemTime) {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since_epoch.subsec_micros()
    );
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Writes the fields it visits as JSON members, comma-separated.
struct Members<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Members<'a> {
    /// Members of an object being opened.
    fn new(out: &'a mut String) -> Members<'a> {
        Members { out, first: true }
    }

    /// Members after those `out` already holds (if any).
    fn after(out: &'a mut String) -> Members<'a> {
        let first = out.is_empty();
        Members { out, first }
    }

    fn key(&mut self, field: &Field) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        write_json_string(self.out, field.name());
        self.out.push(':');
    }
}

impl Visit for Members<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        write_json_string(self.out, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    /// JSON has no NaN or infinity: those are written as `null`, as serde_json does.
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            self.out.push_str(ryu::Buffer::new().format_finite(value));
        } else {
            self.out.push_str("null");
        }
    }

    /// Everything else (`message`, `%display` and `?debug` values) as a string, escaped as
    /// it is formatted, with no copy in between.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        self.out.push('"');
        let _ = write!(Escaped(self.out), "{value:?}");
        self.out.push('"');
    }
}

/// A `fmt::Write` that escapes what it is given for the inside of a JSON string.
struct Escaped<'a>(&'a mut String);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_json_string_contents(self.0, s);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
