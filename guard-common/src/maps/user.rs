//! Userspace side of the map types: aya `Pod` impls (plain old data:
//! repr(C), integers and explicit padding fields).
use super::{Binding, PolicyCounters, SeenKey, SockState};

// SAFETY: repr(C) structs of integers with explicit padding fields.
unsafe impl aya::Pod for Binding {}
// SAFETY: as above.
unsafe impl aya::Pod for SeenKey {}
// SAFETY: as above.
unsafe impl aya::Pod for PolicyCounters {}
// SAFETY: as above.
unsafe impl aya::Pod for SockState {}
