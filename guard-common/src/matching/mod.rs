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

/// Starting value of a suffix hash (the empty suffix).
pub const HASH_INIT: u64 = 0xcbf2_9ce4_8422_2325;
/// Multipliers of the label and suffix mixes (odd 64-bit constants).
const LABEL_PRIME: u64 = 0xff51_afd7_ed55_8ccd;
const SUFFIX_PRIME: u64 = 0x9e37_79b9_7f4a_7c15;

/// ASCII lower-casing, the only case folding DNS defines.
#[inline(always)]
pub const fn fold_case(b: u8) -> u8 {
    if b.is_ascii_uppercase() {
        b | 0x20
    } else {
        b
    }
}

/// [`fold_case`] on the 8 bytes of a word at once (SWAR): bytes `A`..=`Z`
/// get bit 5 set, every other byte (including bytes >= 0x80) is unchanged.
#[inline(always)]
pub const fn fold_case_word(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let low7 = word & !HIGH;
    // High bit of each byte: set where the 7-bit value is >= 'A' ...
    let at_least_a = low7.wrapping_add(ONES * (0x80 - b'A' as u64));
    // ... and where it is > 'Z'.
    let above_z = low7.wrapping_add(ONES * (0x80 - b'Z' as u64 - 1));
    let upper = at_least_a & !above_z & !word & HIGH;
    word | (upper >> 2)
}

/// First value of a label's hash: the length is mixed in so that labels
/// differing only in trailing zero bytes differ.
#[inline(always)]
pub const fn label_hash_start(len: u32) -> u64 {
    HASH_INIT ^ (len as u64)
}

/// One step of a label's hash over 8 bytes of the label (little-endian,
/// zero-padded at the end, already case-folded).
#[inline(always)]
pub const fn label_hash_step(hash: u64, word: u64) -> u64 {
    let mixed = (hash ^ word).wrapping_mul(LABEL_PRIME);
    mixed ^ (mixed >> 32)
}

/// Hash of one label, any case. Labels are bytes: a `.` inside a label is a
/// byte like any other, never a separator.
pub const fn label_hash(label: &[u8]) -> u64 {
    let mut hash = label_hash_start(label.len() as u32);
    let mut at = 0;
    while at < label.len() {
        let mut word = 0u64;
        let mut i = 0;
        while i < 8 && at + i < label.len() {
            word |= (label[at + i] as u64) << (8 * i);
            i += 1;
        }
        hash = label_hash_step(hash, fold_case_word(word));
        at += 8;
    }
    hash
}

/// The hash of the suffix `label.suffix`, from the hash of `suffix` and the
/// label's hash. Names are hashed from their last label to their first, so
/// every label-boundary suffix's hash is met on the way.
#[inline(always)]
pub const fn extend_suffix(suffix: u64, label: u64) -> u64 {
    (suffix.rotate_left(23) ^ label).wrapping_mul(SUFFIX_PRIME)
}

/// Hash of a name given as its labels, first to last.
pub fn labels_hash<'a>(labels: impl DoubleEndedIterator<Item = &'a [u8]>) -> u64 {
    labels.rev().fold(HASH_INIT, |hash, label| {
        extend_suffix(hash, label_hash(label))
    })
}

/// Hash of a dotted name (no trailing dot, any case) whose labels contain no
/// `.`: how patterns are keyed.
pub fn name_hash(dotted: &str) -> u64 {
    if dotted.is_empty() {
        return HASH_INIT;
    }
    labels_hash(dotted.split('.').map(str::as_bytes))
}

/// The labels of a wire-format name without compression (length-prefixed
/// labels ending in the root label), or None if it is not one.
pub fn wire_labels(wire: &[u8]) -> Option<WireLabels<'_>> {
    let mut at = 0;
    loop {
        let len = *wire.get(at)? as usize;
        if len == 0 {
            return (at < 255).then_some(WireLabels { wire, at: 0 });
        }
        if len > 63 {
            return None;
        }
        at += 1 + len;
    }
}

/// Iterator over the labels of a checked wire-format name.
#[derive(Clone, Debug)]
pub struct WireLabels<'a> {
    wire: &'a [u8],
    at: usize,
}

impl<'a> Iterator for WireLabels<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let len = *self.wire.get(self.at)? as usize;
        if len == 0 {
            return None;
        }
        let label = self.wire.get(self.at + 1..self.at + 1 + len)?;
        self.at += 1 + len;
        Some(label)
    }
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

/// The state of one walk over a name's labels, from the last to the first.
///
/// Usage (both sides): for each label from the last to the first, call
/// [`SuffixWalk::push`] with its [`label_hash`]; when it returns a suffix
/// (the labels already pushed, which now have a label in front), look that
/// hash up and pass the entry's wildcard slot to [`SuffixWalk::consider`].
/// After the first label, look up [`SuffixWalk::hash`] and consider the
/// exact slot. [`SuffixWalk::best`] is then the verdict.
#[derive(Clone, Copy, Debug)]
pub struct SuffixWalk {
    /// Hash of the labels pushed so far (after the walk: of the name).
    pub hash: u64,
    pub best: RuleSlot,
    /// Labels pushed so far.
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

    /// Puts a label in front of the suffix walked so far. Returns that
    /// suffix (hash, labels) when it is not empty: the base a `*.` rule
    /// would be keyed by, now that a label stands in front of it.
    #[inline(always)]
    pub fn push(&mut self, label_hash: u64) -> Option<(u64, u32)> {
        let suffix = (self.labels > 0).then_some((self.hash, self.labels));
        self.hash = extend_suffix(self.hash, label_hash);
        self.labels += 1;
        suffix
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
/// re-check what the kernel reported and by the tests. `labels` are the
/// name's labels, first to last, any case.
pub fn decide<'a>(
    labels: impl DoubleEndedIterator<Item = &'a [u8]>,
    lookup: impl FnMut(u64) -> Option<RuleEntry>,
) -> RuleSlot {
    decide_masked(labels, ALL_LABELS, lookup)
}

/// [`decide`], skipping the lookups `label_mask` rules out, as the kernel does.
pub fn decide_masked<'a>(
    labels: impl DoubleEndedIterator<Item = &'a [u8]>,
    label_mask: u64,
    mut lookup: impl FnMut(u64) -> Option<RuleEntry>,
) -> RuleSlot {
    let mut walk = SuffixWalk::new();
    for label in labels.rev() {
        if let Some((suffix, labels)) = walk.push(label_hash(label)) {
            if label_mask & label_bit(labels) != 0 {
                if let Some(entry) = lookup(suffix) {
                    walk.consider(&entry.wildcard);
                }
            }
        }
    }
    if walk.labels > 0 && label_mask & label_bit(walk.labels) != 0 {
        if let Some(entry) = lookup(walk.hash) {
            walk.consider(&entry.exact);
        }
    }
    walk.best
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::HashMap, vec::Vec};

    fn table(rules: &[(&str, Action)]) -> HashMap<u64, RuleEntry> {
        let mut map: HashMap<u64, RuleEntry> = HashMap::new();
        for (id, (pattern, action)) in rules.iter().enumerate() {
            let slot = RuleSlot::new(*action, id as u32);
            match pattern.strip_prefix("*.") {
                Some(base) => {
                    map.entry(name_hash(base))
                        .or_insert(RuleEntry::EMPTY)
                        .wildcard = slot
                }
                None => {
                    map.entry(name_hash(pattern))
                        .or_insert(RuleEntry::EMPTY)
                        .exact = slot
                }
            }
        }
        map
    }

    fn labels(name: &str) -> Vec<&[u8]> {
        if name.is_empty() {
            return Vec::new();
        }
        name.split('.').map(str::as_bytes).collect()
    }

    fn verdict(map: &HashMap<u64, RuleEntry>, name: &str) -> (Action, u32) {
        let slot = decide(labels(name).into_iter(), |h| map.get(&h).copied());
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
    fn a_dot_inside_a_label_is_not_a_separator() {
        let m = table(&[
            ("*.frontend.internal", Action::Block),
            ("a.b.frontend.internal", Action::Allow),
        ]);
        // Three labels "a", "b", "frontend", "internal": the allow applies.
        assert_eq!(verdict(&m, "a.b.frontend.internal").0, Action::Allow);
        // The label "a.b" followed by "frontend", "internal": not the allowed
        // name (four labels), but below *.frontend.internal.
        let name: [&[u8]; 3] = [b"a.b", b"frontend", b"internal"];
        let slot = decide(name.into_iter(), |h| m.get(&h).copied());
        assert_eq!(Action::from_u8(slot.action), Action::Block);
        // "frontend.internal" as one label is not the name frontend.internal.
        let m = table(&[("frontend.internal", Action::Block)]);
        let one: [&[u8]; 1] = [b"frontend.internal"];
        let slot = decide(one.into_iter(), |h| m.get(&h).copied());
        assert_eq!(Action::from_u8(slot.action), Action::None);
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
            let masked = decide_masked(labels(name).into_iter(), mask, |h| {
                lookups += 1;
                m.get(&h).copied()
            });
            let full = decide(labels(name).into_iter(), |h| m.get(&h).copied());
            assert_eq!(masked, full, "{name}");
            // At most one lookup per label count the rules have (1, 2, 3, 6),
            // however many labels the name has.
            assert!(lookups <= mask.count_ones(), "{name}: {lookups} lookups");
        }
    }

    #[test]
    fn suffix_hashes_from_walk_equal_name_hashes() {
        // The property the kernel relies on: walking the labels from the
        // end, each suffix met has the hash its name has.
        let name = "a.bb.ccc.dddd";
        let mut walk = SuffixWalk::new();
        let mut seen = Vec::new();
        for label in labels(name).into_iter().rev() {
            if let Some((hash, count)) = walk.push(label_hash(label)) {
                seen.push((hash, count));
            }
        }
        assert_eq!(
            seen,
            std::vec![
                (name_hash("dddd"), 1),
                (name_hash("ccc.dddd"), 2),
                (name_hash("bb.ccc.dddd"), 3)
            ]
        );
        assert_eq!(walk.hash, name_hash(name));
        assert_eq!(walk.labels, 4);
    }

    #[test]
    fn word_case_folding_equals_byte_case_folding() {
        // Every byte value in every position of a word.
        for byte in 0..=255u8 {
            for position in 0..8 {
                let mut bytes = [b'q'; 8];
                bytes[position] = byte;
                let folded = fold_case_word(u64::from_le_bytes(bytes));
                let expected = bytes.map(fold_case);
                assert_eq!(
                    folded.to_le_bytes(),
                    expected,
                    "byte {byte:#x} at {position}"
                );
            }
        }
    }

    #[test]
    fn label_hashes_differ_by_length_and_content_not_case() {
        assert_eq!(label_hash(b"Frontend"), label_hash(b"frontend"));
        assert_ne!(label_hash(b"frontend"), label_hash(b"frontenD1"));
        assert_ne!(label_hash(b"a"), label_hash(b"a\0"));
        assert_ne!(label_hash(b"abcdefgh"), label_hash(b"abcdefgh\0"));
        assert_ne!(name_hash("a.b"), name_hash("b.a"));
        let long = [b'x'; 63];
        assert_ne!(label_hash(&long), label_hash(&long[..62]));
    }

    #[test]
    fn wire_labels_reads_wire_names_and_refuses_anything_else() {
        let wire = b"\x03api\x08frontend\x08internal\x00";
        let found: Vec<&[u8]> = wire_labels(wire).unwrap().collect();
        assert_eq!(found, [&b"api"[..], b"frontend", b"internal"]);
        assert_eq!(wire_labels(b"\x00").unwrap().count(), 0);
        assert!(wire_labels(b"\x03api").is_none(), "no root label");
        assert!(wire_labels(b"\xc0\x0c").is_none(), "compression pointer");
        assert!(wire_labels(b"\x40aaaa").is_none(), "label over 63");
    }
}
