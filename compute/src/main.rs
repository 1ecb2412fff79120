//! The edge tier entry point.
fn main() {}
