//! The floor of the edge benchmark: a Fastly Compute service that reads the request and answers
//! the bytes of a cached hit (`hit.json`, the body the bench seeds into the edge's KV store).
//! It does nothing else, so the gap to the edge is the edge's own work under the same Viceroy.

use fastly::{Request, Response};

/// The same bytes the edge answers from its KV store in the benchmark.
const HIT_BODY: &[u8] = include_bytes!("hit.json");

fn main() {
    let mut req = Request::from_client();
    // Consume the body as the edge does, so both pay for reading it.
    let _body = req.take_body_bytes();
    Response::from_body(HIT_BODY)
        .with_header("content-type", "application/json")
        .send_to_client();
}
