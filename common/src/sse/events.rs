//! Splitting a byte stream into named Server-Sent Events, as the WHATWG spec and the SDKs read
//! them, for the typed streams (Responses, Messages). Pure; buffers at most one event.

/// One dispatched event: its `event:` name (empty when none) and its `data:` lines joined
/// with "\n".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub(crate) name: String,
    pub(crate) data: Vec<u8>,
}

/// Incremental SSE reader: LF, CRLF or CR line ends, split anywhere across `push` calls;
/// `:` comment lines ignored; an event without `data:` lines is not dispatched, except an
/// `event: error` (with empty data): an upstream that names an error has failed the stream,
/// whatever it sent with it.
#[derive(Debug, Default)]
pub(crate) struct EventReader {
    line: Vec<u8>,
    after_cr: bool,
    name: String,
    data: Vec<u8>,
    has_data: bool,
}

impl EventReader {
    /// Reads `bytes`, appending every event they complete to `out`.
    pub(crate) fn push(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) {
        let mut rest = bytes;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            let line = std::mem::take(&mut self.line);
            self.process(&line, out);
            let mut next = end + 1;
            if rest[end] == b'\r' {
                match rest.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            rest = &rest[next..];
        }
        self.line.extend_from_slice(rest);
    }

    /// The end of the stream: a last event not followed by a blank line still counts.
    pub(crate) fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.process(&line, out);
        }
        self.dispatch(out);
    }

    fn process(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            return self.dispatch(out);
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => self.name = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let name = std::mem::take(&mut self.name);
        if self.has_data || name == "error" {
            self.has_data = false;
            out.push(SseEvent {
                name,
                data: std::mem::take(&mut self.data),
            });
        }
    }
}

/// Appends `event: <name>\ndata: <json>\n\n` to `out`.
pub(crate) fn write_event(out: &mut Vec<u8>, name: &str, data: &serde_json::Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Serializing a Value cannot fail (its keys are strings).
    out.extend_from_slice(data.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// `s` in pieces of at most `n` characters (never splitting a UTF-8 sequence); one empty
/// piece for an empty string.
pub(crate) fn pieces(s: &str, n: usize) -> Vec<&str> {
    let n = n.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    for (count, (i, _)) in s.char_indices().enumerate() {
        if count > 0 && count % n == 0 {
            out.push(&s[start..i]);
            start = i;
        }
    }
    out.push(&s[start..]);
    out
}
