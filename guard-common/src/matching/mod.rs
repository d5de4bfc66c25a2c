//! How a query name is matched against a policy, written once for both sides.
//!
//! A policy compiles to entries keyed by `(policy id, hash of a name)`. Each
//! entry has two slots: `exact` (the rule `frontend.internal`) and `wildcard`
//! (the rule `*.frontend.internal`, stored under the hash of
//! `frontend.internal`). A query name is walked from its last byte to its
//! first; the hash is fed in that order, so at every label boundary the
//! running hash is the hash of the suffix that starts there. Suffixes that
//! start at a label boundary are looked up in the wildcard slot, the whole
//! name in the exact slot. The walk goes from the shortest suffix to the whole
//! name, so the last rule found is the most specific one, which is what lets
//! an `allow` carve an exception out of a broader `deny` (and vice versa).
//!
//! Names are compared in lower case: DNS is case-insensitive and resolvers
//! randomise case (0x20 encoding), so a case-sensitive match is a bypass.

#[cfg(feature = "user")]
mod user;

/// FNV-1a 64-bit offset basis.
pub const HASH_INIT: u64 = 0xcbf2_9ce4_8422_2325;
const HASH_PRIME: u64 = 0x0000_0100_0000_01b3;

/// ASCII lower-casing, the only case folding DNS defines.
#[inline(always)]
pub const fn fold_case(b: u8) -> u8 {
    if b.is_ascii_uppercase() {
        b | 0x20
    } else {
        b
    }
}

/// One step of the suffix hash. Bytes are fed from the end of the name.
#[inline(always)]
pub const fn hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte as u64).wrapping_mul(HASH_PRIME)
}

/// Hash of a whole (already lower-cased, dotted, no trailing dot) name, as the
/// kernel computes it for a suffix of a query name.
pub const fn name_hash(name: &[u8]) -> u64 {
    let mut hash = HASH_INIT;
    let mut i = name.len();
    while i > 0 {
        i -= 1;
        hash = hash_step(hash, fold_case(name[i]));
    }
    hash
}

/// What a matching rule asks for. Stored as `u8` in the maps.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// No rule in this slot.
    None = 0,
    /// An `allow` rule: let the query through, report nothing.
    Allow = 1,
    /// A `deny` rule in enforce mode: drop the query and report it.
    Block = 2,
    /// A `deny` rule in audit mode: let it through and report "would block".
    Audit = 3,
}

impl Action {
    #[inline(always)]
    pub const fn from_u8(value: u8) -> Action {
        match value {
            1 => Action::Allow,
            2 => Action::Block,
            3 => Action::Audit,
            _ => Action::None,
        }
    }
}

/// One rule as stored in a [`RuleEntry`] slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSlot {
    /// An [`Action`] as `u8`.
    pub action: u8,
    pub _pad: [u8; 3],
    /// Index of the rule in the userspace rule table (for reports).
    pub rule_id: u32,
}

impl RuleSlot {
    pub const EMPTY: RuleSlot = RuleSlot {
        action: Action::None as u8,
        _pad: [0; 3],
        rule_id: 0,
    };

    pub const fn new(action: Action, rule_id: u32) -> RuleSlot {
        RuleSlot {
            action: action as u8,
            _pad: [0; 3],
            rule_id,
        }
    }

    #[inline(always)]
    pub const fn is_set(&self) -> bool {
        self.action != Action::None as u8
    }
}

/// Key of the rule map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub policy_id: u32,
    pub _pad: u32,
    pub name_hash: u64,
}

impl RuleKey {
    #[inline(always)]
    pub const fn new(policy_id: u32, name_hash: u64) -> RuleKey {
        RuleKey {
            policy_id,
            _pad: 0,
            name_hash,
        }
    }
}

/// Value of the rule map: the exact rule and the `*.` rule for one name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleEntry {
    pub exact: RuleSlot,
    pub wildcard: RuleSlot,
}

impl RuleEntry {
    pub const EMPTY: RuleEntry = RuleEntry {
        exact: RuleSlot::EMPTY,
        wildcard: RuleSlot::EMPTY,
    };
}

/// The state of one backward walk over a query name.
///
/// Usage (both sides): for each byte of the lower-cased dotted name, from the
/// last to the first, call [`SuffixWalk::step`]; when it returns a hash, look
/// that hash up and pass the entry's wildcard slot to
/// [`SuffixWalk::consider`]. After the first byte, look up
/// [`SuffixWalk::hash`] and consider the exact slot. [`SuffixWalk::best`] is
/// then the verdict.
#[derive(Clone, Copy, Debug)]
pub struct SuffixWalk {
    pub hash: u64,
    pub best: RuleSlot,
    /// Labels in the suffix whose hash [`SuffixWalk::step`] last returned
    /// (after the walk: labels in the whole name).
    pub labels: u32,
}

impl Default for SuffixWalk {
    fn default() -> Self {
        Self::new()
    }
}

impl SuffixWalk {
    pub const fn new() -> SuffixWalk {
        SuffixWalk {
            hash: HASH_INIT,
            best: RuleSlot::EMPTY,
            labels: 0,
        }
    }

    /// Feeds one (lower-cased) byte. Returns the hash of the suffix that
    /// starts right after this byte when the byte is a label separator.
    #[inline(always)]
    pub fn step(&mut self, byte: u8) -> Option<u64> {
        let suffix = self.hash;
        self.hash = hash_step(self.hash, byte);
        if byte == b'.' {
            self.labels += 1;
            Some(suffix)
        } else {
            None
        }
    }

    /// Labels in the whole name, once every byte has been fed.
    #[inline(always)]
    pub fn name_labels(&self) -> u32 {
        self.labels + 1
    }

    /// Records a rule found for the current suffix; later (longer) suffixes
    /// are more specific and override earlier ones.
    #[inline(always)]
    pub fn consider(&mut self, slot: &RuleSlot) {
        if slot.is_set() {
            self.best = *slot;
        }
    }
}

/// Bit of a label count in a policy's label mask: the mask has a bit set for
/// every label count some rule's name has, so the walk can skip lookups that
/// cannot match (a 6-label name against rules of 2 and 3 labels costs two
/// lookups, not six). Counts 64 apart share a bit, which can only add
/// lookups, never skip one. Branch-free on purpose: a comparison on the
/// count would make the verifier track it exactly and stop merging the
/// walk's iterations (seen: 88K -> 681K instructions).
#[inline(always)]
pub const fn label_bit(labels: u32) -> u64 {
    1u64 << (labels & 63)
}

/// A mask that skips no lookup.
pub const ALL_LABELS: u64 = u64::MAX;

/// Reference implementation of the kernel's decision, used by userspace to
/// re-check what the kernel reported and by the tests. `name` is the dotted
/// name without trailing dot, any case.
pub fn decide(name: &[u8], lookup: impl FnMut(u64) -> Option<RuleEntry>) -> RuleSlot {
    decide_masked(name, ALL_LABELS, lookup)
}

/// [`decide`], skipping the lookups `label_mask` rules out, as the kernel does.
pub fn decide_masked(
    name: &[u8],
    label_mask: u64,
    mut lookup: impl FnMut(u64) -> Option<RuleEntry>,
) -> RuleSlot {
    let mut walk = SuffixWalk::new();
    if name.is_empty() {
        return walk.best;
    }
    let mut i = name.len();
    while i > 0 {
        i -= 1;
        if let Some(suffix) = walk.step(fold_case(name[i])) {
            if label_mask & label_bit(walk.labels) != 0 {
                if let Some(entry) = lookup(suffix) {
                    walk.consider(&entry.wildcard);
                }
            }
        }
    }
    if label_mask & label_bit(walk.name_labels()) != 0 {
        if let Some(entry) = lookup(walk.hash) {
            walk.consider(&entry.exact);
        }
    }
    walk.best
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn table(rules: &[(&str, Action)]) -> HashMap<u64, RuleEntry> {
        let mut map: HashMap<u64, RuleEntry> = HashMap::new();
        for (id, (pattern, action)) in rules.iter().enumerate() {
            let slot = RuleSlot::new(*action, id as u32);
            match pattern.strip_prefix("*.") {
                Some(base) => {
                    map.entry(name_hash(base.as_bytes()))
                        .or_insert(RuleEntry::EMPTY)
                        .wildcard = slot
                }
                None => {
                    map.entry(name_hash(pattern.as_bytes()))
                        .or_insert(RuleEntry::EMPTY)
                        .exact = slot
                }
            }
        }
        map
    }

    fn verdict(map: &HashMap<u64, RuleEntry>, name: &str) -> (Action, u32) {
        let slot = decide(name.as_bytes(), |h| map.get(&h).copied());
        (Action::from_u8(slot.action), slot.rule_id)
    }

    #[test]
    fn exact_rule_matches_only_that_name() {
        let m = table(&[("frontend.internal", Action::Block)]);
        assert_eq!(verdict(&m, "frontend.internal"), (Action::Block, 0));
        assert_eq!(verdict(&m, "api.frontend.internal").0, Action::None);
        assert_eq!(verdict(&m, "notfrontend.internal").0, Action::None);
        assert_eq!(verdict(&m, "frontend.internal.evil").0, Action::None);
        assert_eq!(verdict(&m, "internal").0, Action::None);
    }

    #[test]
    fn wildcard_matches_every_depth_below_but_not_apex_or_lookalikes() {
        let m = table(&[("*.frontend.internal", Action::Block)]);
        assert_eq!(verdict(&m, "a.frontend.internal").0, Action::Block);
        assert_eq!(verdict(&m, "a.b.c.frontend.internal").0, Action::Block);
        assert_eq!(verdict(&m, "frontend.internal").0, Action::None);
        assert_eq!(verdict(&m, "notfrontend.internal").0, Action::None);
        assert_eq!(verdict(&m, "a.notfrontend.internal").0, Action::None);
        assert_eq!(verdict(&m, "x-frontend.internal").0, Action::None);
    }

    #[test]
    fn case_is_ignored() {
        let m = table(&[("frontend.internal", Action::Block)]);
        assert_eq!(verdict(&m, "FrOnTeNd.InTeRnAl").0, Action::Block);
        let m = table(&[("*.Frontend.Internal", Action::Block)]);
        assert_eq!(verdict(&m, "API.FRONTEND.INTERNAL").0, Action::Block);
    }

    #[test]
    fn more_specific_rule_wins_in_both_directions() {
        let m = table(&[
            ("*.internal", Action::Block),
            ("*.frontend.internal", Action::Allow),
            ("api.frontend.internal", Action::Block),
            ("status.internal", Action::Allow),
        ]);
        assert_eq!(verdict(&m, "db.internal"), (Action::Block, 0));
        assert_eq!(verdict(&m, "cdn.frontend.internal"), (Action::Allow, 1));
        assert_eq!(verdict(&m, "api.frontend.internal"), (Action::Block, 2));
        assert_eq!(verdict(&m, "v2.api.frontend.internal"), (Action::Allow, 1));
        assert_eq!(verdict(&m, "status.internal"), (Action::Allow, 3));
        assert_eq!(verdict(&m, "x.status.internal"), (Action::Block, 0));
        // An exact allow of the apex does not cover names below it.
        assert_eq!(verdict(&m, "frontend.internal"), (Action::Block, 0));
    }

    #[test]
    fn empty_name_matches_nothing() {
        let m = table(&[("*.internal", Action::Block)]);
        assert_eq!(verdict(&m, "").0, Action::None);
    }

    #[test]
    fn label_mask_skips_lookups_without_changing_any_verdict() {
        let rules = [
            ("*.internal", Action::Block),
            ("*.frontend.internal", Action::Allow),
            ("api.frontend.internal", Action::Block),
            ("x.y.z.w.deep.example", Action::Block),
        ];
        let m = table(&rules);
        let mask = rules.iter().fold(0u64, |mask, (p, _)| {
            let base = p.strip_prefix("*.").unwrap_or(p);
            mask | label_bit(base.split('.').count() as u32)
        });
        let names = [
            "internal",
            "db.internal",
            "frontend.internal",
            "a.frontend.internal",
            "api.frontend.internal",
            "v2.api.frontend.internal",
            "x.y.z.w.deep.example",
            "q.x.y.z.w.deep.example",
            "deep.example",
            "",
            "a.b.c.d.e.f.g.h.i.j.internal",
            "notfrontend.internal",
        ];
        for name in names {
            let mut lookups = 0;
            let masked = decide_masked(name.as_bytes(), mask, |h| {
                lookups += 1;
                m.get(&h).copied()
            });
            let full = decide(name.as_bytes(), |h| m.get(&h).copied());
            assert_eq!(masked, full, "{name}");
            // At most one lookup per label count the rules have (1, 2, 3, 6),
            // however many labels the name has.
            assert!(lookups <= mask.count_ones(), "{name}: {lookups} lookups");
        }
    }

    #[test]
    fn suffix_hashes_from_walk_equal_name_hashes() {
        // The property the kernel relies on: the running hash at a label
        // boundary equals name_hash of the suffix after it.
        let name = b"a.bb.ccc.dddd";
        let mut walk = SuffixWalk::new();
        let mut seen = std::vec::Vec::new();
        for &b in name.iter().rev() {
            if let Some(h) = walk.step(b) {
                seen.push(h);
            }
        }
        assert_eq!(
            seen,
            std::vec![
                name_hash(b"dddd"),
                name_hash(b"ccc.dddd"),
                name_hash(b"bb.ccc.dddd")
            ]
        );
        assert_eq!(walk.hash, name_hash(name));
    }
}
