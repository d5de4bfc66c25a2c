//! The questions `guard deps` answers, computed from the store's rows:
//! which services a service or name affects, what a service depends on,
//! the cycles of the service graph, and a policy that keeps a service's
//! deploys off its dependents.
use std::collections::{BTreeMap, BTreeSet};

use petgraph::{algo::tarjan_scc, graphmap::DiGraphMap};
use serde::Serialize;

use super::store::{severity, Resolution, Service};

/// What a group of lookups adds up to (one service's, or one name's).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Totals {
    /// When the latest of them was made.
    pub last_seen: String,
    /// Queries over every deploy.
    pub queries: i64,
    /// Distinct deploys (host, run) that made them.
    pub deploys: usize,
    /// The strictest verdict any of them got.
    pub verdict: String,
    /// The process chain of the latest.
    pub example_chain: String,
}

impl Totals {
    fn of(lookups: &[&Resolution]) -> Totals {
        let latest = latest(lookups);
        Totals {
            last_seen: latest.first_seen.clone(),
            queries: lookups.iter().map(|l| l.queries).sum(),
            deploys: lookups
                .iter()
                .map(|l| (&l.host, &l.run_id))
                .collect::<BTreeSet<_>>()
                .len(),
            verdict: lookups
                .iter()
                .max_by_key(|l| severity(&l.verdict))
                .map(|l| l.verdict.clone())
                .unwrap_or_default(),
            example_chain: latest.process_chain.clone(),
        }
    }
}

/// The catalog's owner and tier of a service, if it lists it.
fn owner_and_tier(services: &[Service], service: Option<&str>) -> (Option<String>, Option<i64>) {
    services
        .iter()
        .find(|s| Some(s.name.as_str()) == service)
        .map_or((None, None), |s| (s.owner.clone(), s.tier))
}

/// Lookups grouped by `key`, in key order.
fn group_by<'a>(
    resolutions: impl Iterator<Item = &'a Resolution>,
    key: impl Fn(&'a Resolution) -> &'a str,
) -> BTreeMap<&'a str, Vec<&'a Resolution>> {
    let mut groups: BTreeMap<&str, Vec<&Resolution>> = BTreeMap::new();
    for resolution in resolutions {
        groups.entry(key(resolution)).or_default().push(resolution);
    }
    groups
}

/// A service whose deploys resolved the names asked about.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Affected {
    pub service: String,
    pub owner: Option<String>,
    pub tier: Option<i64>,
    pub names: Vec<String>,
    #[serde(flatten)]
    pub totals: Totals,
}

/// The services whose deploys resolved any of `resolutions` (already
/// filtered to the target), most business-critical tier first; `target`
/// (a service) is left out of its own list.
pub fn affected(target: &str, resolutions: &[Resolution], services: &[Service]) -> Vec<Affected> {
    let groups = group_by(resolutions.iter().filter(|r| r.service != target), |r| {
        &r.service
    });
    let mut affected: Vec<Affected> = groups
        .into_iter()
        .map(|(service, lookups)| {
            let (owner, tier) = owner_and_tier(services, Some(service));
            Affected {
                service: service.to_owned(),
                owner,
                tier,
                names: lookups
                    .iter()
                    .map(|l| l.name.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                totals: Totals::of(&lookups),
            }
        })
        .collect();
    affected.sort_by(|a, b| {
        tier_order(a.tier)
            .cmp(&tier_order(b.tier))
            .then_with(|| a.service.cmp(&b.service))
    });
    affected
}

/// A name a service's deploys resolved.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Dependency {
    pub name: String,
    /// The service serving it; `None`: no service of the catalog claims it.
    pub service: Option<String>,
    pub owner: Option<String>,
    pub tier: Option<i64>,
    /// The name whose answer led here, for names reached through answers.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub via: String,
    #[serde(flatten)]
    pub totals: Totals,
}

/// What a service's deploys resolved (`resolutions` made by it), by
/// serving service (unclaimed names last), then name.
pub fn dependencies(resolutions: &[Resolution], services: &[Service]) -> Vec<Dependency> {
    let mut dependencies: Vec<Dependency> = group_by(resolutions.iter(), |r| &r.name)
        .into_iter()
        .map(|(name, lookups)| {
            let latest = latest(&lookups);
            let (owner, tier) = owner_and_tier(services, latest.serving_service.as_deref());
            Dependency {
                name: name.to_owned(),
                service: latest.serving_service.clone(),
                owner,
                tier,
                via: latest.via.clone(),
                totals: Totals::of(&lookups),
            }
        })
        .collect();
    dependencies.sort_by(|a, b| {
        (a.service.is_none(), &a.service, &a.name).cmp(&(b.service.is_none(), &b.service, &b.name))
    });
    dependencies
}

/// One lookup that proves an edge of the graph.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Witness {
    pub name: String,
    pub host: String,
    pub run_id: String,
    pub first_seen: String,
    pub process_chain: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// Lookups (rows) behind the edge.
    pub lookups: usize,
    /// The latest of them.
    pub witness: Witness,
}

/// The service graph's edges (one per ordered pair of services), each with
/// its latest lookup as witness.
pub fn edges(resolutions: &[Resolution]) -> Vec<Edge> {
    let mut by_pair: BTreeMap<(&str, &str), Vec<&Resolution>> = BTreeMap::new();
    for resolution in resolutions {
        if let Some(to) = resolution.serving_service.as_deref() {
            if to != resolution.service {
                by_pair
                    .entry((&resolution.service, to))
                    .or_default()
                    .push(resolution);
            }
        }
    }
    by_pair
        .into_iter()
        .map(|((from, to), lookups)| {
            let witness = latest(&lookups);
            Edge {
                from: from.to_owned(),
                to: to.to_owned(),
                lookups: lookups.len(),
                witness: Witness {
                    name: witness.name.clone(),
                    host: witness.host.clone(),
                    run_id: witness.run_id.clone(),
                    first_seen: witness.first_seen.clone(),
                    process_chain: witness.process_chain.clone(),
                },
            }
        })
        .collect()
}

/// A strongly connected component of more than one service: every service
/// in it depends, through deploys, on every other.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Cycle {
    pub services: Vec<String>,
    /// One cycle through all of it when there is a simple one that short,
    /// else one through its first service: `a → b → c → a`.
    pub path: Vec<String>,
    /// Every edge between its services, each with a witness lookup.
    pub edges: Vec<Edge>,
}

/// Every cycle of the service graph (Tarjan's strongly connected
/// components), largest first.
pub fn cycles(edges: &[Edge]) -> Vec<Cycle> {
    let mut graph: DiGraphMap<&str, ()> = DiGraphMap::new();
    for edge in edges {
        graph.add_edge(&edge.from, &edge.to, ());
    }
    let mut cycles: Vec<Cycle> = tarjan_scc(&graph)
        .into_iter()
        .filter(|component| component.len() > 1)
        .map(|mut component| {
            component.sort_unstable();
            let members: BTreeSet<&str> = component.iter().copied().collect();
            Cycle {
                path: path_back(&graph, component[0], &members),
                services: component.iter().map(|s| (*s).to_owned()).collect(),
                edges: edges
                    .iter()
                    .filter(|e| {
                        members.contains(e.from.as_str()) && members.contains(e.to.as_str())
                    })
                    .cloned()
                    .collect(),
            }
        })
        .collect();
    cycles.sort_by(|a, b| {
        b.services
            .len()
            .cmp(&a.services.len())
            .then_with(|| a.services.cmp(&b.services))
    });
    cycles
}

/// The shortest way from `start` back to itself inside the component
/// (breadth first, so the path is a simple cycle).
fn path_back(graph: &DiGraphMap<&str, ()>, start: &str, members: &BTreeSet<&str>) -> Vec<String> {
    let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        let mut next: Vec<&str> = graph.neighbors(node).collect();
        next.sort_unstable();
        for neighbour in next {
            if neighbour == start {
                let mut back = Vec::new();
                let mut at = node;
                while at != start {
                    back.push(at.to_owned());
                    at = previous[at];
                }
                back.reverse();
                let mut path = vec![start.to_owned()];
                path.extend(back);
                path.push(start.to_owned());
                return path;
            }
            if members.contains(neighbour) && !previous.contains_key(neighbour) {
                previous.insert(neighbour, node);
                queue.push_back(neighbour);
            }
        }
    }
    Vec::new()
}

/// Names resolved by some deploy that no service of the catalog serves.
pub fn unclaimed(resolutions: &[Resolution]) -> BTreeMap<&str, BTreeSet<&str>> {
    let mut names: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for resolution in resolutions.iter().filter(|r| r.serving_service.is_none()) {
        names
            .entry(&resolution.name)
            .or_default()
            .insert(&resolution.service);
    }
    names
}

fn latest<'a>(lookups: &[&'a Resolution]) -> &'a Resolution {
    lookups
        .iter()
        .max_by(|a, b| {
            (&a.first_seen, &a.run_id, &a.name).cmp(&(&b.first_seen, &b.run_id, &b.name))
        })
        .expect("a group has a lookup")
}

/// Tier 1 first; services without a tier last.
fn tier_order(tier: Option<i64>) -> (bool, i64) {
    (tier.is_none(), tier.unwrap_or(0))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn resolution(service: &str, name: &str, serving: Option<&str>, seen: &str) -> Resolution {
        Resolution {
            service: service.into(),
            host: "h".into(),
            run_id: format!("run-{seen}"),
            name: name.into(),
            first_seen: seen.into(),
            queries: 2,
            verdict: "allowed".into(),
            process_chain: format!("deploy-{service}[1]"),
            via: String::new(),
            serving_service: serving.map(Into::into),
        }
    }

    #[test]
    fn finds_a_three_service_cycle_with_a_witness_per_edge() {
        let rows = vec![
            resolution("db", "api.frontend.internal", Some("frontend"), "t1"),
            resolution("db", "api.frontend.internal", Some("frontend"), "t3"),
            resolution("frontend", "cache.internal", Some("cache"), "t1"),
            resolution("cache", "db.internal", Some("db"), "t1"),
            resolution("batch", "db.internal", Some("db"), "t1"),
            resolution("db", "db.internal", Some("db"), "t1"),
        ];
        let edges = edges(&rows);
        assert_eq!(edges.len(), 4, "self-lookups are no edge: {edges:?}");
        let cycles = cycles(&edges);
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert_eq!(cycles[0].services, ["cache", "db", "frontend"]);
        assert_eq!(cycles[0].path, ["cache", "db", "frontend", "cache"]);
        assert_eq!(cycles[0].edges.len(), 3);
        let db_frontend = cycles[0].edges.iter().find(|e| e.from == "db").unwrap();
        assert_eq!(db_frontend.lookups, 2);
        assert_eq!(db_frontend.witness.first_seen, "t3", "the latest lookup");
    }

    #[test]
    fn affected_lists_dependents_by_tier() {
        let services = vec![
            Service {
                name: "batch".into(),
                owner: Some("ops".into()),
                tier: Some(3),
                names: vec![],
            },
            Service {
                name: "cache".into(),
                owner: Some("infra".into()),
                tier: Some(1),
                names: vec![],
            },
        ];
        let rows = vec![
            resolution("batch", "db.internal", Some("db"), "t1"),
            resolution("cache", "db.internal", Some("db"), "t2"),
            resolution("cache", "x.db.internal", Some("db"), "t1"),
            resolution("adhoc", "db.internal", Some("db"), "t1"),
            resolution("db", "db.internal", Some("db"), "t1"),
        ];
        let affected = affected("db", &rows, &services);
        let order: Vec<&str> = affected.iter().map(|a| a.service.as_str()).collect();
        assert_eq!(order, ["cache", "batch", "adhoc"]);
        assert_eq!(affected[0].totals.queries, 4);
        assert_eq!(affected[0].names, ["db.internal", "x.db.internal"]);
        assert_eq!(affected[0].totals.last_seen, "t2");
        assert_eq!(affected[2].owner, None);
    }
}
