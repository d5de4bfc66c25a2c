//! Userspace side of the rule map types: aya `Pod` impls (plain old data:
//! repr(C), integers and explicit padding fields).
use super::{RuleEntry, RuleKey};

// SAFETY: repr(C) structs of integers with explicit padding fields.
unsafe impl aya::Pod for RuleKey {}
// SAFETY: as above.
unsafe impl aya::Pod for RuleEntry {}
