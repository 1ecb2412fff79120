//! The contract both tiers share. Pure: no I/O, no clock, no async runtime.
