//! The origin tier.
