//! The contract both tiers share: canonical requests, cache keys, entries and their sealing,
//! policy, SSE, headers, errors, tenants and usage records. Pure: no I/O, no clock, no threads, no async runtime; builds for the host
//! and for wasm32-wasip1 so the edge and the origin agree byte for byte.

pub mod canonical;
pub mod echo;
pub mod entry;
pub mod error;
pub mod headers;
pub mod key;
pub mod policy;
pub mod route;
pub mod seal;
pub mod sse;
pub mod tenant;
pub mod traceparent;
pub mod usage;

pub use canonical::{
    DEFAULT_MAX_BODY_BYTES, DROPPED_FIELDS, ParsedRequest, RequestError, canonicalize,
    parse_request,
};
pub use entry::{
    ENTRY_VERSION, Entry, EntryError, Envelope, Header, MAX_METADATA_BYTES, PLAIN_VERSION, Stored,
    Usage,
};
pub use error::ApiError;
pub use headers::{CacheOutcome, CacheStatusMember, Fwd, Layer, ServerTiming};
pub use key::{
    CacheKey, KEY_VERSION, KeySecret, TenantIdError, api_key_digest, bearer_token,
    validate_tenant_id,
};
pub use policy::{Bypass, Freshness, Plan, RequestDirectives};
pub use route::Route;
pub use seal::{KeySource, Keyring, NoKeys, SealError, SealKey, TenantKey};
pub use sse::{Assembler, ChatAssembler, SseError, replay, replay_chat};
pub use tenant::{Tenant, TenantsFile};
pub use traceparent::TraceContext;
pub use usage::{Outcome, Tier, UsageRecord};
