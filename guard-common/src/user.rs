//! aya `Pod` impls: these types are plain old data (repr(C), no padding the
//! kernel could leave uninitialised that we rely on).
use crate::{
    maps::{Binding, PolicyCounters, SeenKey},
    matching::{RuleEntry, RuleKey},
};

// SAFETY: repr(C) structs of integers with explicit padding fields.
unsafe impl aya::Pod for RuleKey {}
// SAFETY: as above.
unsafe impl aya::Pod for RuleEntry {}
// SAFETY: as above.
unsafe impl aya::Pod for Binding {}
// SAFETY: as above.
unsafe impl aya::Pod for SeenKey {}
// SAFETY: as above.
unsafe impl aya::Pod for PolicyCounters {}
